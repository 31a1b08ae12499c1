//! Fuzzes the `karrots.yaml` loader: any input must give a spec or located problems, never a
//! panic, and every problem must point at a line that exists.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("environments/prod/karrots.yaml");
    if let Err(problems) = karrots::config::parse_environment(text, file, "prod") {
        // YAML breaks lines at LF, CR and CRLF alike.
        let breaks = text.replace("\r\n", "\n").matches(['\n', '\r']).count();
        let last_line = breaks + 1;
        for problem in problems.iter() {
            assert_eq!(problem.path, file);
            assert!(problem.line >= 1 && problem.line <= last_line, "{problem} (of {last_line} lines)");
            assert!(!problem.message.is_empty());
        }
    }
});
