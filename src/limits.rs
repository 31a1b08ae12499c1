//! How much of a configuration file Karrots reads, and how much of a long message it keeps
//! ([`tail`]).
//!
//! Every YAML, HCL and JSON file the checks parse is read through [`read_text`], so no commit
//! can make a check hold a file larger than [`MAX_TEXT_BYTES`] in memory. Nesting depth is
//! bounded by the parsers: Karrots' YAML reader refuses more than 64 levels before any
//! recursive parser sees the text (see `config::yaml`), and the HCL and JSON parsers refuse
//! more than 64 and 512 levels themselves (pinned by tests).

use std::io::Read;
use std::path::Path;

/// The largest configuration file (`karrots.yaml`, a `.tf` file, a policy, the daemon config)
/// Karrots reads. Real ones are a few KiB; a larger one is an accident or an attack on the
/// daemon's memory.
pub const MAX_TEXT_BYTES: usize = 1024 * 1024;

/// Why a file is not read.
pub fn too_large(size: u64) -> String {
    format!("the file is {size} bytes; Karrots reads at most {MAX_TEXT_BYTES} bytes")
}

/// Why a run does not export a file (daemon config `max_file_size`).
pub fn too_large_to_export(size: u64, limit: u64) -> String {
    format!(
        "the file is {size} bytes; a run exports files of at most {limit} bytes (max_file_size in the daemon configuration)"
    )
}

/// The text of `path`, refused without reading it when larger than [`MAX_TEXT_BYTES`].
pub fn read_text(path: &Path) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    if size > MAX_TEXT_BYTES as u64 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            too_large(size),
        ));
    }
    let mut text = String::new();
    // A file that grows while it is read stops at the limit (plus one byte, to notice).
    let read = file
        .take(MAX_TEXT_BYTES as u64 + 1)
        .read_to_string(&mut text)?;
    if read > MAX_TEXT_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            too_large(read as u64),
        ));
    }
    Ok(text)
}

/// The last `limit` bytes of `text` (cut at a character boundary), marked when cut.
pub fn tail(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let mut start = text.len() - limit;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[…]{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_over_the_limit_are_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::write(&small, "a: 1\n").unwrap();
        assert_eq!(read_text(&small).unwrap(), "a: 1\n");
        let large = dir.path().join("large");
        std::fs::write(&large, vec![b'x'; MAX_TEXT_BYTES + 1]).unwrap();
        let error = read_text(&large).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the file is 1048577 bytes; Karrots reads at most 1048576 bytes"
        );
    }
}
