//! Files a person attaches to a task or to a follow-up, on their way from the relay to the agent.
//!
//! A frame is at most [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN) (1 MiB), so each file travels as
//! [`FilePart`]s of at most [`CHUNK_BYTES`] (base64 in JSON: about 683 KiB a frame), in order, on the same
//! stream and just before the `StartTask` or `TaskInput` they belong to. The agent assembles the parts of one
//! task (bounded by the sizes below, whatever the parts claim), and hands the finished batch to the next
//! start or input of that task; parts still pending when the link drops are dropped with it.
//!
//! Negotiation: only an agent whose [`ProjectsReport`](crate::project::ProjectsReport) says `accepts_files`
//! is sent a `FilePart`; an older agent could not decode the variant, and the relay refuses a task with files
//! for it, saying to upgrade the agent.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// Largest file accepted (bytes).
pub const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// Largest sum of the files of one task, or of one follow-up (bytes).
pub const MAX_TASK_FILES_BYTES: u64 = 25 * 1024 * 1024;
/// Most files on one task or follow-up (Discord itself allows 10 on a message).
pub const MAX_FILES: usize = 10;
/// Most bytes of a file in one [`FilePart`].
pub const CHUNK_BYTES: usize = 512 * 1024;
/// Longest file name kept, in characters (Discord's own names can be longer; the tail is cut).
pub const MAX_NAME_CHARS: usize = 100;

/// One piece of one attached file. Every file sends at least one part (an empty file: one empty part).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePart {
    pub task: String,
    /// Which file of the batch, from 0.
    pub index: u32,
    /// How many files the batch has.
    pub count: u32,
    /// The file's name as the person gave it; the agent makes it safe again before using it.
    pub name: String,
    /// The whole file's size in bytes.
    pub size: u64,
    /// The MIME type Discord reported, if any (images are also given to Claude as images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Where this part's bytes start in the file; parts come in order.
    pub offset: u64,
    /// The bytes, standard base64.
    pub data: String,
}

/// A whole file, as the relay keeps it and the agent assembles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub name: String,
    pub media_type: Option<String>,
    pub data: Vec<u8>,
}

impl Attachment {
    /// The file as parts for `task`: file `index` of `count`.
    pub fn parts(&self, task: &str, index: u32, count: u32) -> Vec<FilePart> {
        let mut chunks: Vec<&[u8]> = self.data.chunks(CHUNK_BYTES).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let mut offset = 0u64;
        chunks
            .into_iter()
            .map(|chunk| {
                let part = FilePart {
                    task: task.to_string(),
                    index,
                    count,
                    name: self.name.clone(),
                    size: self.data.len() as u64,
                    media_type: self.media_type.clone(),
                    offset,
                    data: STANDARD.encode(chunk),
                };
                offset += chunk.len() as u64;
                part
            })
            .collect()
    }

    /// The image type Claude accepts for this file (by its declared type, else its name), if it is one.
    pub fn image_type(&self) -> Option<&'static str> {
        image_type(self.media_type.as_deref(), &self.name)
    }
}

/// Every part of a batch of files, in order.
pub fn parts_of(task: &str, files: &[Attachment]) -> Vec<FilePart> {
    let count = files.len() as u32;
    files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| f.parts(task, i as u32, count))
        .collect()
}

/// Decodes a part's bytes, refusing more than one chunk's worth before decoding.
pub fn decode_part(data: &str) -> Option<Vec<u8>> {
    if data.len() > CHUNK_BYTES.div_ceil(3) * 4 {
        return None;
    }
    STANDARD.decode(data).ok()
}

/// The image media types the Messages API takes as image content.
pub fn image_type(media_type: Option<&str>, name: &str) -> Option<&'static str> {
    let by_type = media_type.map(|t| {
        t.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    });
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match (by_type.as_deref(), ext.as_str()) {
        (Some("image/png"), _) | (None, "png") => Some("image/png"),
        (Some("image/jpeg" | "image/jpg"), _) | (None, "jpg" | "jpeg") => Some("image/jpeg"),
        (Some("image/gif"), _) | (None, "gif") => Some("image/gif"),
        (Some("image/webp"), _) | (None, "webp") => Some("image/webp"),
        _ => None,
    }
}

/// A file name a person chose, made safe to use as one path component: no separators, no `..`, no leading
/// dot (nothing hidden, nothing that reads as a parent), no control or bidirectional-override characters
/// (which could make a name read as another in a listing), at most [`MAX_NAME_CHARS`] characters. Never
/// empty.
pub fn safe_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| match c {
            '/' | '\\' | ':' | '\0' => '_',
            c if c.is_control() || is_invisible(c) => '_',
            c => c,
        })
        .collect();
    // Collapsing runs of dots keeps `..` out of the name anywhere, not only as the whole of it.
    let mut out = String::with_capacity(cleaned.len());
    for c in cleaned.chars() {
        if c == '.' && out.ends_with('.') {
            continue;
        }
        out.push(c);
    }
    let out = out
        .trim()
        .trim_start_matches(['.', ' ', '_'])
        .trim_end_matches(['.', ' ']);
    let mut out: String = out.chars().take(MAX_NAME_CHARS).collect();
    if out.is_empty() {
        out = "file".into();
    }
    out
}

/// Characters that change how text is shown without being seen: bidirectional controls, zero-width ones.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}' | '\u{061C}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FrameReader, FrameWriter, RelayMessage, MAX_FRAME_LEN};

    #[test]
    fn names_cannot_escape_hide_or_disguise() {
        for (given, want) in [
            ("../../etc/passwd", "etc_passwd"),
            ("..", "file"),
            ("...", "file"),
            (".bashrc", "bashrc"),
            ("a/../b", "a_._b"),
            ("notes..txt", "notes.txt"),
            ("C:\\Windows\\x", "C__Windows_x"),
            ("evil\u{202E}gpj.exe", "evil_gpj.exe"),
            ("zero\u{200B}width", "zero_width"),
            ("tab\there", "tab_here"),
            ("", "file"),
            ("report.log", "report.log"),
            ("shot 1.png", "shot 1.png"),
        ] {
            assert_eq!(safe_name(given), want, "{given:?}");
        }
        let long = "x".repeat(500);
        assert_eq!(safe_name(&long).chars().count(), MAX_NAME_CHARS);
    }

    #[test]
    fn images_are_known_by_type_or_else_by_name() {
        assert_eq!(image_type(Some("image/png"), "a.bin"), Some("image/png"));
        assert_eq!(image_type(Some("image/jpeg; q=1"), "a"), Some("image/jpeg"));
        assert_eq!(image_type(None, "A.WEBP"), Some("image/webp"));
        assert_eq!(image_type(Some("text/plain"), "a.png"), None);
        assert_eq!(image_type(Some("image/svg+xml"), "a.svg"), None);
    }

    #[tokio::test]
    async fn the_largest_part_fits_in_a_frame_and_parts_rebuild_the_file() {
        let file = Attachment {
            name: "big.bin".into(),
            media_type: None,
            data: (0..(CHUNK_BYTES * 2 + 7)).map(|i| i as u8).collect(),
        };
        let parts = parts_of("t_x", std::slice::from_ref(&file));
        assert_eq!(parts.len(), 3);
        let (a, b) = tokio::io::duplex(4 * MAX_FRAME_LEN);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b);
        let mut rebuilt = Vec::new();
        for part in &parts {
            w.send(&RelayMessage::FilePart(part.clone())).await.unwrap();
            let Some(RelayMessage::FilePart(got)) = r.recv::<RelayMessage>().await.unwrap() else {
                panic!("not a part");
            };
            assert_eq!(got.offset, rebuilt.len() as u64);
            rebuilt.extend(decode_part(&got.data).unwrap());
        }
        assert_eq!(rebuilt, file.data);
        // An empty file still announces itself.
        let empty = Attachment {
            name: "e".into(),
            media_type: None,
            data: vec![],
        };
        assert_eq!(empty.parts("t", 0, 1).len(), 1);
        // A part claiming more than a chunk is refused before decoding.
        assert!(decode_part(&"A".repeat(CHUNK_BYTES * 2)).is_none());
    }
}
