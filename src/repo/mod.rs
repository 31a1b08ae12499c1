//! The config repository as data: its environments, the modules each reaches, the checks of
//! the repository rules and each environment's input fingerprint.
//!
//! Works on a directory tree (a working copy, or a commit exported to a workdir); it never
//! runs terraform or git. [`check_repository`] judges a whole tree (`karrots check`);
//! [`check_environment`] judges what one environment is built from, so a problem in another
//! environment's folder does not stop it.

pub mod escalation;
mod fingerprint;
mod layout;
mod module;
mod policy;

pub use fingerprint::{Fingerprint, fingerprint};
pub use layout::CONFIG_FOLDERS;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::{
    Backend, EnvName, EnvironmentFile, EnvironmentSpec, ProviderPattern, RepoPath,
    default_provider_patterns, parse_environment_file,
};
use crate::problem::{Problem, relative_to};
use module::{ModuleScan, ModuleSource, scan_module};

/// What the operator decides for every environment, beyond the repository's own files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOptions {
    /// Provider sources a commit may require (daemon config `terraform.providers`).
    pub providers: Vec<ProviderPattern>,
    /// The largest file a run exports from a commit (daemon config `max_file_size`).
    pub max_file_bytes: u64,
}

/// The default `max_file_size`: far above any configuration file, below what would strain
/// the daemon's memory (a blob is inflated whole to be exported).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

impl Default for CheckOptions {
    fn default() -> CheckOptions {
        CheckOptions {
            providers: default_provider_patterns(),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }
}

/// An environment that passed every check, with what it is built from.
#[derive(Debug, Clone)]
pub struct CheckedEnvironment {
    pub spec: EnvironmentSpec,
    /// The directories whose files are this environment's inputs.
    pub inputs: BTreeSet<RepoPath>,
    /// The root module and every local module it reaches.
    pub modules: BTreeSet<RepoPath>,
    /// SHA-256 over the module declarations `terraform init` acts on (see
    /// `ModuleScan::init_declarations`): equal signatures need no new init.
    pub init_signature: String,
    pub fingerprint: Fingerprint,
}

/// The outcome of `karrots check`: the environments that passed, and every problem found.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub environments: Vec<CheckedEnvironment>,
    pub problems: Vec<Problem>,
}

/// Checks the config repository whose working tree is at `root`, with the default options.
pub fn check_repository(root: &Path) -> CheckReport {
    check_repository_with(root, &CheckOptions::default())
}

/// Checks the whole config repository whose working tree is at `root`.
pub fn check_repository_with(root: &Path, options: &CheckOptions) -> CheckReport {
    let mut report = CheckReport::default();
    if !root.is_dir() {
        report.problems.push(Problem::whole(
            root,
            "not a directory: give --repo the root of a config repository",
        ));
        return report;
    }
    report.problems.extend(layout::scan_layout(root));
    let environment_files = load_environments(root, &mut report.problems);
    let mut scans: HashMap<RepoPath, ModuleScan> = HashMap::new();
    for file in &environment_files {
        match check_loaded_environment(root, file, &mut scans, options) {
            Ok(checked) => report.environments.push(checked),
            Err(refused) => report.problems.extend(refused.problems),
        }
    }
    check_shared_state(&environment_files, &mut report.problems);
    report.problems.extend(lint_policies(root));
    report.problems.sort();
    report.problems.dedup();
    report
}

/// Checks what environment `name` is built from: its `karrots.yaml`, the modules it reaches,
/// `policies/`, and the repository's top-level files. Problems elsewhere (another
/// environment's folder, a module it does not reach) are not its problems.
pub fn check_environment(
    root: &Path,
    name: &EnvName,
    options: &CheckOptions,
) -> Result<CheckedEnvironment, Vec<Problem>> {
    let yaml_path = environment_file_path(name.as_str());
    let text = crate::limits::read_text(&root.join(&yaml_path)).map_err(|error| {
        vec![Problem::whole(
            &yaml_path,
            format!("environment {name} does not exist here: {error}"),
        )]
    })?;
    let file = parse_environment_file(&text, &yaml_path, name.as_str())
        .map_err(|problems| problems.into_vec())?;
    let checked = check_loaded_environment(root, &file, &mut HashMap::new(), options);
    // A refused environment's layout problems are still its own: those among the inputs
    // found before the refusal (its folder at least) are reported with the rest.
    let inputs: BTreeSet<RepoPath> = match &checked {
        Ok(checked) => checked.inputs.clone(),
        Err(refused) => refused.inputs.clone(),
    };
    let mut problems: Vec<Problem> = layout::scan_layout(root)
        .into_iter()
        .filter(|problem| {
            let path = crate::config::to_slash(&problem.path);
            let top_level = !path.contains('/') && !CONFIG_FOLDERS.contains(&path.as_str());
            top_level || inputs.iter().any(|input| input.contains(&path))
        })
        .collect();
    problems.extend(lint_policies(root));
    match checked {
        Ok(checked) if problems.is_empty() => Ok(checked),
        Ok(_) => {
            problems.sort();
            problems.dedup();
            Err(problems)
        }
        Err(refused) => {
            problems.extend(refused.problems);
            problems.sort();
            problems.dedup();
            Err(problems)
        }
    }
}

/// The local modules `module` calls, as the check reads them from the tree at `root`: how a
/// stage finds the modules an environment reaches, to export only those.
pub fn local_module_calls(root: &Path, module: &RepoPath) -> Vec<RepoPath> {
    scan_module(root, module)
        .calls
        .into_iter()
        .filter_map(|call| match call.source {
            ModuleSource::Local(path) => Some(path),
            ModuleSource::Remote(_) => None,
        })
        .collect()
}

/// Why an environment is refused, and the inputs known when it was (its folder at least).
struct Refused {
    problems: Vec<Problem>,
    inputs: BTreeSet<RepoPath>,
}

/// Everything about one loaded environment: its modules and their refusals, the providers
/// they require, its symlinks, its fingerprint.
fn check_loaded_environment(
    root: &Path,
    file: &EnvironmentFile,
    scans: &mut HashMap<RepoPath, ModuleScan>,
    options: &CheckOptions,
) -> Result<CheckedEnvironment, Refused> {
    let mut problems = Vec::new();
    let own_folder: BTreeSet<RepoPath> =
        RepoPath::parse(&format!("environments/{}", file.spec.name))
            .into_iter()
            .collect();
    let Some(modules) = check_environment_modules(root, file, scans, &mut problems) else {
        return Err(Refused {
            problems,
            inputs: own_folder,
        });
    };
    check_providers(&file.spec, &modules, scans, options, &mut problems);
    let mut inputs = modules.clone();
    inputs.extend(
        [
            format!("environments/{}", file.spec.name),
            "policies".to_string(),
        ]
        .iter()
        .filter_map(|path| RepoPath::parse(path).ok()),
    );
    check_symlinks_stay_in_closure(root, &file.spec, &inputs, &mut problems);
    if !problems.is_empty() {
        return Err(Refused { problems, inputs });
    }
    let init_signature = init_signature(&modules, scans);
    match fingerprint(root, &inputs) {
        Ok(fingerprint) => Ok(CheckedEnvironment {
            spec: file.spec.clone(),
            inputs,
            modules,
            init_signature,
            fingerprint,
        }),
        Err(error) => Err(Refused {
            problems: vec![Problem::whole(
                environment_file_path(file.spec.name.as_str()),
                format!("cannot read the environment's inputs: {error}"),
            )],
            inputs,
        }),
    }
}

/// Every `policies/*.json` as an IAM policy document.
fn lint_policies(root: &Path) -> Vec<Problem> {
    let mut problems = Vec::new();
    let Ok(entries) = fs::read_dir(root.join("policies")) else {
        return problems;
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "json") && p.is_file())
        .collect();
    paths.sort();
    // The worker's own policies, read together: may they let it widen its own permissions?
    let mut worker = Vec::new();
    let mut texts = std::collections::BTreeMap::new();
    for path in paths {
        let relative = relative_to(root, &path);
        match crate::limits::read_text(&path) {
            Ok(text) => {
                let found = policy::lint_policy(&relative, &text);
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                if found.is_empty()
                    && name.starts_with("karrots-worker-")
                    && name != escalation::BOUNDARY_FILE
                    && let Ok(document) = serde_json::from_str(&text)
                {
                    let file = relative.display().to_string();
                    worker.extend(escalation::statements(&file, &document));
                    texts.insert(file, text);
                }
                problems.extend(found);
            }
            Err(error) => problems.push(Problem::whole(
                relative,
                format!("cannot read the file: {error}"),
            )),
        }
    }
    for (call, statement) in escalation::escalations(&worker) {
        let text = texts.get(&statement.file).map_or("", String::as_str);
        let line = text
            .find(&format!("\"{}\"", statement.sid))
            .filter(|_| !statement.sid.is_empty())
            .map_or(1, |offset| crate::problem::line_of_offset(text, offset));
        problems.push(Problem::new(
            &statement.file,
            line,
            format!(
                "the worker could make itself more than it is: statement {:?} allows {} on {}{} ({}); see the escalation rules in docs/platform.md",
                statement.sid,
                call.action,
                call.resource,
                call.context
                    .iter()
                    .map(|(key, value)| format!(" with {key}={value}"))
                    .collect::<String>(),
                call.why
            ),
        ));
    }
    problems
}

/// A provider outside the operator's allow-list is refused: `terraform init` would download
/// and a plan would run whatever the commit names.
fn check_providers(
    spec: &EnvironmentSpec,
    modules: &BTreeSet<RepoPath>,
    scans: &HashMap<RepoPath, ModuleScan>,
    options: &CheckOptions,
    problems: &mut Vec<Problem>,
) {
    for scan in modules.iter().filter_map(|module| scans.get(module)) {
        let declared: BTreeSet<&str> = scan
            .providers
            .iter()
            .filter(|p| !p.implied)
            .map(|p| p.local_name.as_str())
            .collect();
        for requirement in &scan.providers {
            if requirement.implied && declared.contains(requirement.local_name.as_str()) {
                continue;
            }
            let source = requirement
                .source
                .clone()
                .unwrap_or_else(|| format!("hashicorp/{}", requirement.local_name));
            if options
                .providers
                .iter()
                .any(|pattern| pattern.matches(&source))
            {
                continue;
            }
            let allowed: Vec<String> = options.providers.iter().map(ToString::to_string).collect();
            problems.push(Problem::new(
                &requirement.file,
                requirement.line,
                format!(
                    "provider {source:?} ({}) is not in the daemon's terraform.providers ({}) and is refused for environment {}: ask the operator to allow it",
                    requirement.local_name,
                    allowed.join(", "),
                    spec.name
                ),
            ));
        }
    }
}

/// A symlink among an environment's inputs must resolve, physically, to a file among the same
/// inputs: the checkout holds nothing else, and the fingerprint hashes what it points at.
/// Links that leave the repository are the layout scan's to report.
fn check_symlinks_stay_in_closure(
    root: &Path,
    spec: &EnvironmentSpec,
    inputs: &BTreeSet<RepoPath>,
    problems: &mut Vec<Problem>,
) {
    let Ok(root_real) = fs::canonicalize(root) else {
        return;
    };
    for input in inputs {
        for entry in walkdir::WalkDir::new(input.to_path(root))
            .follow_links(false)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|entry| entry.path_is_symlink())
        {
            let path = entry.path();
            let relative = relative_to(root, path);
            let Ok(target) = fs::read_link(path) else {
                continue;
            };
            if layout::symlink_leaves(root, path) {
                continue; // reported by the layout scan
            }
            // Where the link points, read lexically: a tree checked without the other
            // environments' folders must still name a link into one for what it is.
            let lexical = relative
                .parent()
                .map(|parent| parent.join(&target))
                .and_then(|joined| RepoPath::parse(&crate::config::to_slash(&joined)).ok());
            let outside =
                |path: &RepoPath| !inputs.iter().any(|input| input.contains(path.as_str()));
            let why = match fs::canonicalize(path) {
                Err(_) => match lexical.filter(|path| !target.is_absolute() && outside(path)) {
                    Some(path) => format!(
                        "symlink to {} resolves to {path}, which is not a file of environment {}'s inputs (its folder, the modules it reaches, policies/)",
                        target.display(),
                        spec.name
                    ),
                    None => format!(
                        "symlink to {} dangles: its target does not exist",
                        target.display()
                    ),
                },
                Ok(_) if target.is_absolute() => format!(
                    "symlink to {} is absolute: a link must point, relatively, at a file of environment {}'s inputs",
                    target.display(),
                    spec.name
                ),
                Ok(resolved) => {
                    let inside = resolved
                        .strip_prefix(&root_real)
                        .map(crate::config::to_slash)
                        .unwrap_or_default();
                    if resolved.is_file() && inputs.iter().any(|input| input.contains(&inside)) {
                        continue;
                    }
                    format!(
                        "symlink to {} resolves to {inside}, which is not a file of environment {}'s inputs (its folder, the modules it reaches, policies/)",
                        target.display(),
                        spec.name
                    )
                }
            };
            problems.push(Problem::whole(relative, why));
        }
    }
}

fn environment_file_path(folder: &str) -> PathBuf {
    Path::new("environments").join(folder).join("karrots.yaml")
}

/// Reads every `environments/<env>/karrots.yaml`, reporting the ones that do not load.
fn load_environments(root: &Path, problems: &mut Vec<Problem>) -> Vec<EnvironmentFile> {
    let entries = match fs::read_dir(root.join("environments")) {
        Ok(entries) => entries,
        Err(_) => {
            problems.push(Problem::whole(
                "environments",
                "no environments/ folder: a config repository has one folder per environment, environments/<env>/karrots.yaml",
            ));
            return Vec::new();
        }
    };
    let mut folders: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    folders.sort();
    let mut loaded = Vec::new();
    for folder in folders {
        let relative = relative_to(root, &folder);
        let name = folder
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if !folder.is_dir() {
            problems.push(Problem::whole(
                relative,
                "only environment folders belong in environments/",
            ));
            continue;
        }
        if let Err(message) = crate::config::EnvName::parse(&name) {
            problems.push(Problem::whole(relative, format!("folder name: {message}")));
            continue;
        }
        let file = environment_file_path(&name);
        match crate::limits::read_text(&root.join(&file)) {
            Ok(text) => match parse_environment_file(&text, &file, &name) {
                Ok(parsed) => loaded.push(parsed),
                Err(found) => problems.extend(found.into_vec()),
            },
            Err(error) => problems.push(Problem::whole(
                &relative,
                format!("environment folder without a readable karrots.yaml: {error}"),
            )),
        }
    }
    if loaded.is_empty() && problems.is_empty() {
        problems.push(Problem::whole(
            "environments",
            "no environment found: add environments/<env>/karrots.yaml",
        ));
    }
    loaded
}

fn init_signature(modules: &BTreeSet<RepoPath>, scans: &HashMap<RepoPath, ModuleScan>) -> String {
    let mut hasher = Sha256::new();
    for module in modules {
        for declaration in scans
            .get(module)
            .map(|s| &s.init_declarations)
            .into_iter()
            .flatten()
        {
            hasher.update((declaration.len() as u64).to_be_bytes());
            hasher.update(declaration.as_bytes());
        }
    }
    hex::encode(hasher.finalize())
}

/// Walks the modules an environment reaches, reporting refusals under its `allow:` list.
/// Returns the modules reached when they are all acceptable.
fn check_environment_modules(
    root: &Path,
    file: &EnvironmentFile,
    scans: &mut HashMap<RepoPath, ModuleScan>,
    problems: &mut Vec<Problem>,
) -> Option<BTreeSet<RepoPath>> {
    let spec = &file.spec;
    let yaml_path = environment_file_path(spec.name.as_str());
    let root_module = &spec.terraform.root;
    if !root_module.to_path(root).is_dir() {
        problems.push(Problem::new(
            &yaml_path,
            file.line("terraform.root"),
            format!("terraform.root: {root_module} is not a directory in the repository"),
        ));
        return None;
    }
    let problems_before = problems.len();
    let mut reached: BTreeSet<RepoPath> = BTreeSet::new();
    let mut queue = vec![root_module.clone()];
    while let Some(module) = queue.pop() {
        if !reached.insert(module.clone()) {
            continue;
        }
        let scan = scans
            .entry(module.clone())
            .or_insert_with(|| scan_module(root, &module));
        problems.extend(scan.problems.iter().cloned());
        for risk in &scan.risks {
            if !spec.allow.contains(&risk.allowance) {
                problems.push(Problem::new(
                    &risk.file,
                    risk.line,
                    format!(
                        "{} is refused for environment {} (name {} in allow: of {} to permit it)",
                        risk.construct,
                        spec.name,
                        risk.allowance.name(),
                        yaml_path.display()
                    ),
                ));
            }
        }
        for call in &scan.calls {
            match &call.source {
                ModuleSource::Local(path) if path.to_path(root).is_dir() => {
                    queue.push(path.clone());
                }
                ModuleSource::Local(path) => problems.push(Problem::new(
                    &call.file,
                    call.line,
                    format!("module source: {path} is not a directory in the repository"),
                )),
                ModuleSource::Remote(source)
                    if !spec
                        .allow
                        .contains(&crate::config::Allowance::RemoteModules) =>
                {
                    problems.push(Problem::new(
                        &call.file,
                        call.line,
                        format!(
                            "module source {source:?} is not a local path inside the repository and is refused for environment {} (name remote-modules in allow: of {} to permit it)",
                            spec.name,
                            yaml_path.display()
                        ),
                    ));
                }
                ModuleSource::Remote(_) => {}
            }
        }
    }
    if problems.len() > problems_before {
        return None;
    }
    Some(reached)
}

/// Two environments writing one S3 state object would overwrite each other's state.
fn check_shared_state(files: &[EnvironmentFile], problems: &mut Vec<Problem>) {
    let mut owners: BTreeMap<(String, String), &EnvironmentFile> = BTreeMap::new();
    for file in files {
        if let Backend::S3(s3) = &file.spec.terraform.backend {
            let key = (s3.bucket.clone(), s3.key.clone());
            if let Some(first) = owners.get(&key) {
                problems.push(Problem::new(
                    environment_file_path(file.spec.name.as_str()),
                    file.line("terraform.backend.s3.key"),
                    format!(
                        "terraform.backend.s3: s3://{}/{} is already the state of environment {}",
                        s3.bucket, s3.key, first.spec.name
                    ),
                ));
            } else {
                owners.insert(key, file);
            }
        }
    }
}
