//! What a Terraform module's `.tf` files say that matters before it may run: the modules it
//! calls and the constructs that run code or reach out from the Karrots host.
//!
//! The files are read with a real HCL parser (`hcl-edit`, which keeps byte spans for lines).
//! Scanning is per module directory and knows nothing of environments: whether a construct is
//! allowed depends on the environment's `allow:` list and is decided by the caller.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use hcl_edit::Span;
use hcl_edit::expr::Expression;
use hcl_edit::structure::{Block, Body, Structure};

use crate::config::{Allowance, RepoPath};
use crate::problem::{Problem, line_of_offset};

/// The findings of one module directory.
#[derive(Debug, Default, Clone)]
pub(crate) struct ModuleScan {
    pub calls: Vec<ModuleCall>,
    /// Constructs that are refused unless an environment's `allow:` names them.
    pub risks: Vec<Risk>,
    /// Problems that no `allow:` can lift: unparsable files, sources that leave the repository.
    pub problems: Vec<Problem>,
    /// The declarations that decide what `terraform init` installs: `required_providers`
    /// blocks, module calls and the providers implied by resource types. When none of them
    /// changed (nor the lock file), a new commit can reuse the previous init.
    pub init_declarations: BTreeSet<String>,
    /// Every provider the module requires, explicitly or by a resource type's prefix.
    pub providers: Vec<ProviderRequirement>,
}

/// A provider a module makes terraform install, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProviderRequirement {
    pub file: PathBuf,
    pub line: usize,
    /// The local name (`aws`) a resource type or `required_providers` entry uses.
    pub local_name: String,
    /// The source address from `required_providers`; `None` when terraform would assume
    /// `hashicorp/<local_name>`.
    pub source: Option<String>,
    /// Implied by a resource or data type rather than declared in `required_providers`.
    pub implied: bool,
}

/// A `module` block, located.
#[derive(Debug, Clone)]
pub(crate) struct ModuleCall {
    pub file: PathBuf,
    pub line: usize,
    pub source: ModuleSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ModuleSource {
    /// `./x` or `../x`, resolved to a directory path inside the repository.
    Local(RepoPath),
    /// A registry address, git or HTTP URL: code that is not in the commit.
    Remote(String),
}

#[derive(Debug, Clone)]
pub(crate) struct Risk {
    pub file: PathBuf,
    pub line: usize,
    pub allowance: Allowance,
    /// The construct as a user would search for it, e.g. `provisioner "local-exec"`.
    pub construct: String,
}

/// Scans the `.tf` and `.tofu` files directly inside `module` (Terraform does not read
/// subdirectories; OpenTofu reads `.tofu` besides `.tf`, so both are checked alike).
pub(crate) fn scan_module(root: &Path, module: &RepoPath) -> ModuleScan {
    let mut scan = ModuleScan::default();
    let directory = module.to_path(root);
    let root_real = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    // A symlink that leaves the repository is reported by the layout scan; it is never read.
    let stays_inside =
        |path: &PathBuf| fs::canonicalize(path).is_ok_and(|real| real.starts_with(&root_real));
    let mut files: Vec<PathBuf> = match fs::read_dir(&directory) {
        Ok(entries) => entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                path.extension()
                    .is_some_and(|ext| ext == "tf" || ext == "tofu")
                    && path.is_file()
            })
            .filter(stays_inside)
            .collect(),
        Err(error) => {
            scan.problems.push(Problem::whole(
                module.as_str(),
                format!("cannot read the module directory: {error}"),
            ));
            return scan;
        }
    };
    files.sort();
    for path in files {
        let relative = PathBuf::from(module.as_str()).join(path.file_name().unwrap_or_default());
        match crate::limits::read_text(&path) {
            Ok(text) => scan_file(&mut scan, module, &relative, &text),
            Err(error) => scan.problems.push(Problem::whole(
                &relative,
                format!("cannot read the file: {error}"),
            )),
        }
    }
    scan
}

/// Scans the text of one `.tf` file of `module`, adding to `scan`.
pub(crate) fn scan_file(scan: &mut ModuleScan, module: &RepoPath, file: &Path, text: &str) {
    let body = match hcl_edit::parser::parse_body(text) {
        Ok(body) => body,
        Err(error) => {
            scan.problems.push(Problem::new(
                file,
                error.location().line(),
                format!("not valid HCL: {}", error.message()),
            ));
            return;
        }
    };
    let line_of = |span: Option<std::ops::Range<usize>>| {
        span.map_or(1, |range| line_of_offset(text, range.start))
    };
    let source_text = |span: Option<std::ops::Range<usize>>| {
        span.and_then(|range| text.get(range))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    for block in body.iter().filter_map(Structure::as_block) {
        let line = line_of(block.span());
        if matches!(block.ident.as_str(), "resource" | "data")
            && let Some(kind) = block.labels.first()
        {
            let provider = kind.as_str().split('_').next().unwrap_or_default();
            scan.init_declarations
                .insert(format!("{module}: provider type {provider}"));
            // `terraform_data` and friends are built into terraform itself.
            if provider != "terraform" {
                scan.providers.push(ProviderRequirement {
                    file: file.to_path_buf(),
                    line,
                    local_name: provider.to_string(),
                    source: None,
                    implied: true,
                });
            }
        }
        match block.ident.as_str() {
            "module" => {
                scan.init_declarations
                    .insert(format!("{module}: {}", source_text(block.span())));
                scan_module_call(scan, module, file, block, line, &line_of)
            }
            "data" => {
                let kind = block.labels.first().map(|label| label.as_str());
                let allowance = match kind {
                    Some("external") => Some(Allowance::ExternalData),
                    Some("http") => Some(Allowance::HttpData),
                    Some("terraform_remote_state") => Some(Allowance::RemoteState),
                    _ => None,
                };
                if let (Some(allowance), Some(kind)) = (allowance, kind) {
                    scan.risks.push(Risk {
                        file: file.to_path_buf(),
                        line,
                        allowance,
                        construct: format!("data source \"{kind}\""),
                    });
                }
            }
            "terraform" => {
                for inner in block.body.iter().filter_map(Structure::as_block) {
                    if inner.ident.as_str() == "required_providers" {
                        scan.init_declarations
                            .insert(format!("{module}: {}", source_text(inner.span())));
                        for attribute in inner.body.attributes() {
                            let source = match &attribute.value {
                                Expression::Object(object) => {
                                    object.iter().find_map(|(key, value)| {
                                        let is_source =
                                            key.as_ident().is_some_and(|k| k.as_str() == "source");
                                        match value.expr() {
                                            Expression::String(text) if is_source => {
                                                Some(text.as_str().to_string())
                                            }
                                            _ => None,
                                        }
                                    })
                                }
                                // The old `aws = "~> 5.0"` form: a version, the default source.
                                _ => None,
                            };
                            scan.providers.push(ProviderRequirement {
                                file: file.to_path_buf(),
                                line: line_of(attribute.span()),
                                local_name: attribute.key.as_str().to_string(),
                                source,
                                implied: false,
                            });
                        }
                    }
                    if matches!(inner.ident.as_str(), "backend" | "cloud") {
                        scan.problems.push(Problem::new(
                            file,
                            line_of(inner.span()),
                            format!(
                                "terraform {{ {} }} is not allowed: Karrots configures the backend from terraform.backend in karrots.yaml",
                                inner.ident.as_str()
                            ),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    find_provisioners(scan, file, &body, &line_of);
}

fn scan_module_call(
    scan: &mut ModuleScan,
    module: &RepoPath,
    file: &Path,
    block: &Block,
    line: usize,
    line_of: &dyn Fn(Option<std::ops::Range<usize>>) -> usize,
) {
    let name = block.labels.first().map_or("?", |label| label.as_str());
    let Some(attribute) = block.body.get_attribute("source") else {
        scan.problems.push(Problem::new(
            file,
            line,
            format!("module \"{name}\" has no source"),
        ));
        return;
    };
    let source_line = line_of(attribute.span());
    let Expression::String(source) = &attribute.value else {
        scan.problems.push(Problem::new(
            file,
            source_line,
            format!("module \"{name}\": source must be a literal string"),
        ));
        return;
    };
    let source = source.as_str();
    if source.starts_with("./") || source.starts_with("../") {
        match module.join(source) {
            Some(path) => scan.calls.push(ModuleCall {
                file: file.to_path_buf(),
                line: source_line,
                source: ModuleSource::Local(path),
            }),
            None => scan.problems.push(Problem::new(
                file,
                source_line,
                format!("module \"{name}\": source {source:?} leaves the repository"),
            )),
        }
    } else {
        scan.calls.push(ModuleCall {
            file: file.to_path_buf(),
            line: source_line,
            source: ModuleSource::Remote(source.to_string()),
        });
    }
}

/// `provisioner` blocks can sit in any resource, at any depth; look everywhere.
fn find_provisioners(
    scan: &mut ModuleScan,
    file: &Path,
    body: &Body,
    line_of: &dyn Fn(Option<std::ops::Range<usize>>) -> usize,
) {
    for block in body.iter().filter_map(Structure::as_block) {
        if block.ident.as_str() == "provisioner" {
            let kind = block.labels.first().map(|label| label.as_str());
            let allowance = match kind {
                Some("local-exec") => Some(Allowance::LocalExec),
                Some("remote-exec") => Some(Allowance::RemoteExec),
                _ => None,
            };
            if let (Some(allowance), Some(kind)) = (allowance, kind) {
                scan.risks.push(Risk {
                    file: file.to_path_buf(),
                    line: line_of(block.span()),
                    allowance,
                    construct: format!("provisioner \"{kind}\""),
                });
            }
        }
        find_provisioners(scan, file, &block.body, line_of);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(text: &str) -> ModuleScan {
        let mut scan = ModuleScan::default();
        let module = RepoPath::parse("modules/app").unwrap();
        scan_file(&mut scan, &module, Path::new("modules/app/main.tf"), text);
        scan
    }

    #[test]
    fn module_sources_are_classified() {
        let found = scan(
            "module \"net\" {\n  source = \"../network\"\n}\nmodule \"vpc\" {\n  source = \"terraform-aws-modules/vpc/aws\"\n}\n",
        );
        assert!(found.problems.is_empty(), "{:?}", found.problems);
        let sources: Vec<(usize, ModuleSource)> = found
            .calls
            .iter()
            .map(|call| (call.line, call.source.clone()))
            .collect();
        assert_eq!(
            sources,
            vec![
                (
                    2,
                    ModuleSource::Local(RepoPath::parse("modules/network").unwrap())
                ),
                (
                    5,
                    ModuleSource::Remote("terraform-aws-modules/vpc/aws".to_string())
                ),
            ]
        );
    }

    #[test]
    fn sources_that_escape_or_are_computed_are_problems() {
        let found = scan(
            "module \"a\" {\n  source = \"../../../etc\"\n}\nmodule \"b\" {\n  source = \"./${var.x}\"\n}\nmodule \"c\" {}\n",
        );
        let lines: Vec<String> = found.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "modules/app/main.tf:2: module \"a\": source \"../../../etc\" leaves the repository",
                "modules/app/main.tf:5: module \"b\": source must be a literal string",
                "modules/app/main.tf:7: module \"c\" has no source",
            ]
        );
    }

    #[test]
    fn risky_constructs_are_found_at_any_depth() {
        let found = scan(
            "resource \"terraform_data\" \"x\" {\n  provisioner \"local-exec\" {\n    command = \"id\"\n  }\n}\n\ndata \"external\" \"e\" {\n  program = [\"sh\"]\n}\ndata \"http\" \"h\" {\n  url = \"https://example.invalid\"\n}\ndata \"aws_caller_identity\" \"me\" {}\nresource \"aws_instance\" \"i\" {\n  provisioner \"remote-exec\" {}\n  provisioner \"file\" {}\n}\n",
        );
        let risks: Vec<(usize, Allowance)> = found
            .risks
            .iter()
            .map(|risk| (risk.line, risk.allowance))
            .collect();
        let mut risks_sorted = risks.clone();
        risks_sorted.sort();
        assert_eq!(
            risks_sorted,
            vec![
                (2, Allowance::LocalExec),
                (7, Allowance::ExternalData),
                (10, Allowance::HttpData),
                (15, Allowance::RemoteExec),
            ]
        );
    }

    #[test]
    fn init_declarations_ignore_what_init_does_not_read() {
        let base = "terraform {\n  required_providers {\n    aws = { source = \"hashicorp/aws\" }\n  }\n}\nmodule \"net\" {\n  source = \"../network\"\n  cidr = \"10.0.0.0/16\"\n}\nresource \"aws_vpc\" \"a\" {\n  cidr_block = \"10.0.0.0/16\"\n}\n";
        let declarations = |text: &str| scan(text).init_declarations;
        let first = declarations(base);
        assert_eq!(first.len(), 3, "{first:?}");
        // A changed attribute of a resource or a new resource of a known provider: same init.
        let edited = base.replace(
            "cidr_block = \"10.0.0.0/16\"",
            "cidr_block = \"10.1.0.0/16\"",
        ) + "resource \"aws_subnet\" \"b\" {}\n";
        assert_eq!(declarations(&edited), first);
        // A new provider, a changed module call or changed requirements: init again.
        assert_ne!(
            declarations(&(base.to_string() + "resource \"random_id\" \"x\" {}\n")),
            first
        );
        assert_ne!(
            declarations(&base.replace("../network", "../network2")),
            first
        );
        assert_ne!(
            declarations(&base.replace("hashicorp/aws\"", "hashicorp/aws\", version = \"~> 5.0\"")),
            first
        );
    }

    #[test]
    fn backend_blocks_and_parse_errors_are_problems() {
        let found = scan("terraform {\n  backend \"s3\" {}\n}\n");
        assert_eq!(found.problems[0].line, 2);
        let broken = scan("resource \"a\" \"b\" {\n  x = \n");
        assert_eq!(broken.problems.len(), 1);
        assert!(broken.problems[0].message.starts_with("not valid HCL"));
    }

    #[test]
    fn provider_requirements_are_found_with_their_sources() {
        let found = scan(
            "terraform {\n  required_providers {\n    aws = { source = \"hashicorp/aws\", version = \"~> 5.0\" }\n    evil = {\n      source = \"evilcorp/evil\"\n    }\n    random = \"~> 3.0\"\n  }\n}\nresource \"null_resource\" \"n\" {}\nresource \"terraform_data\" \"t\" {}\n",
        );
        let found: Vec<(usize, &str, Option<&str>)> = found
            .providers
            .iter()
            .map(|p| (p.line, p.local_name.as_str(), p.source.as_deref()))
            .collect();
        assert_eq!(
            found,
            vec![
                (3, "aws", Some("hashicorp/aws")),
                (4, "evil", Some("evilcorp/evil")),
                (7, "random", None),
                (10, "null", None),
            ]
        );
    }

    /// The parser bounds nesting itself, before it recurses: a 100,000-level expression or
    /// block tree is a located problem, on a thread with the 2 MiB stack tokio gives workers.
    #[test]
    fn deep_nesting_is_refused_by_the_parser_without_exhausting_the_stack() {
        let deep = [
            format!("x = {}1{}\n", "[".repeat(100_000), "]".repeat(100_000)),
            format!("x = {}true\n", "!".repeat(100_000)),
            format!(
                "x = \"{}x{}\"\n",
                "${\"".repeat(100_000),
                "\"}".repeat(100_000)
            ),
            format!("{}{}", "b {\n".repeat(100_000), "}\n".repeat(100_000)),
        ];
        for text in deep {
            let found = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || scan(&text).problems)
                .unwrap()
                .join()
                .unwrap();
            assert_eq!(found.len(), 1, "{found:?}");
            assert!(found[0].message.contains("nest"), "{found:?}");
        }
    }
}
