//! Files attached to a task: assembled from the relay's [`FilePart`]s (bounded, whatever the parts claim),
//! saved where the task can read them, `.codetogether/attachments/<task>/` inside its folder (git-ignored),
//! and named in its prompt; images are also handed to Claude Code as image content.
//!
//! The folder is the project's (or the task's worktree), which the policy already resolved to a real path
//! inside the allowed folders; what is inside it is not trusted: a `.codetogether` that is a symlink, or a
//! file name that tries to climb out, is refused, and nothing is written through a symlink.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;

use ct_protocol::files::{
    decode_part, safe_name, Attachment, FilePart, MAX_FILES, MAX_FILE_BYTES, MAX_TASK_FILES_BYTES,
};
use rustix::fs::{self as rfs, Mode, OFlags};
use rustix::io::Errno;
use serde_json::{json, Value};

/// Batches being assembled at once (one per task with files on the way); more is a misbehaving relay.
const MAX_PENDING: usize = 8;
/// Largest image given to Claude Code as image content (the Messages API takes about 5 MB of base64); a
/// larger one is still saved and named, for Claude to read as a file.
pub const MAX_IMAGE_BYTES: usize = 3 * 1024 * 1024 + 512 * 1024;
/// Largest total of the images of one message given as image content.
pub const MAX_IMAGES_BYTES: usize = 3 * MAX_IMAGE_BYTES;
/// The folder, relative to the task's, where its files go (followed by the task id).
pub const ATTACHMENTS_DIR: &str = ".codetogether/attachments";

/// The batches of files on their way, by task.
#[derive(Debug, Default)]
pub struct Assembly {
    pending: HashMap<String, Batch>,
}

#[derive(Debug)]
struct Batch {
    files: Vec<Option<Attachment>>,
    sizes: Vec<u64>,
    bytes: u64,
    /// A part broke a rule: the batch is refused when its message comes.
    broken: Option<String>,
}

impl Assembly {
    /// Adds one part. A part that breaks a bound marks its batch broken (its task is told when it starts)
    /// and keeps none of its bytes.
    pub fn part(&mut self, part: FilePart) {
        if !self.pending.contains_key(&part.task) && self.pending.len() >= MAX_PENDING {
            tracing::warn!(task = %part.task, "too many batches of files at once; this one is dropped");
            return;
        }
        let count = part.count as usize;
        let batch = self
            .pending
            .entry(part.task.clone())
            .or_insert_with(|| Batch {
                files: vec![None; count.min(MAX_FILES)],
                sizes: vec![0; count.min(MAX_FILES)],
                bytes: 0,
                broken: None,
            });
        if batch.broken.is_some() {
            return;
        }
        if let Err(why) = batch.add(part) {
            tracing::warn!(%why, "an attached file was refused");
            batch.files.iter_mut().for_each(|f| *f = None);
            batch.broken = Some(why);
        }
    }

    /// The finished batch for `task`'s next start or input: `None` when none came, an error (for the task to
    /// show) when it is incomplete or broke a bound.
    pub fn take(&mut self, task: &str) -> Option<Result<Vec<Attachment>, String>> {
        let batch = self.pending.remove(task)?;
        if let Some(why) = batch.broken {
            return Some(Err(why));
        }
        let mut out = Vec::with_capacity(batch.files.len());
        for (f, size) in batch.files.into_iter().zip(batch.sizes) {
            match f {
                Some(f) if f.data.len() as u64 == size => out.push(f),
                _ => return Some(Err("an attached file arrived incomplete".into())),
            }
        }
        Some(Ok(out))
    }

    /// A link ended: parts of it are never completed.
    pub fn clear(&mut self) {
        self.pending.clear();
    }
}

impl Batch {
    fn add(&mut self, part: FilePart) -> Result<(), String> {
        if part.count as usize > MAX_FILES || part.count as usize != self.files.len() {
            return Err(format!(
                "more than {MAX_FILES} files, or a count that changed"
            ));
        }
        let i = part.index as usize;
        if i >= self.files.len() {
            return Err("a file index past the count".into());
        }
        if part.size > MAX_FILE_BYTES {
            return Err(format!("a file over {} MiB", MAX_FILE_BYTES >> 20));
        }
        let data = decode_part(&part.data).ok_or("a part that is not base64 of at most a chunk")?;
        let file = self.files[i].get_or_insert_with(|| Attachment {
            name: part.name.clone(),
            media_type: part.media_type.clone(),
            data: Vec::new(),
        });
        if self.sizes[i] == 0 {
            self.sizes[i] = part.size;
        }
        if part.size != self.sizes[i] || part.offset != file.data.len() as u64 {
            return Err("parts out of order".into());
        }
        if file.data.len() as u64 + data.len() as u64 > part.size {
            return Err("a file longer than it said".into());
        }
        self.bytes += data.len() as u64;
        if self.bytes > MAX_TASK_FILES_BYTES {
            return Err(format!(
                "files over {} MiB in all",
                MAX_TASK_FILES_BYTES >> 20
            ));
        }
        file.data.extend_from_slice(&data);
        Ok(())
    }
}

/// Where a batch was saved: the folder relative to the task's, and the names the files got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub dir: String,
    pub names: Vec<String>,
}

impl Saved {
    /// `prompt` with the line that names the files.
    pub fn prompt(&self, prompt: &str) -> String {
        format!(
            "{prompt}\n\nAttached files (in {}/): {}",
            self.dir,
            self.names.join(", ")
        )
    }
}

/// Saves `files` in `cwd/.codetogether/attachments/<task>/`. Blocking: run it off the async threads.
///
/// The folders are walked by descriptor: each one is opened relative to the one above it, without following
/// a link, and the files are created in the last one the same way. Another task running in the same project
/// (a grantee's, whose sandbox may write there) cannot swap a folder for a link between a check and a write
/// and have the agent write outside the project.
pub fn save(cwd: &Path, task: &str, files: &[Attachment]) -> Result<Saved, String> {
    let task_dir = safe_name(task);
    if task_dir != task || !task.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("{task:?} is not a task id"));
    }
    let root = cwd
        .canonicalize()
        .map_err(|e| format!("the task's folder cannot be opened: {e}"))?;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let root_fd = rfs::openat(rfs::CWD, &root, flags, Mode::empty()).map_err(|e| {
        format!(
            "the task's folder cannot be opened: {}",
            std::io::Error::from(e)
        )
    })?;
    let ct = child_dir(&root_fd, ".codetogether", &root)?;
    ignore_all(&ct, &root)?;
    let attachments = child_dir(&ct, "attachments", &root)?;
    let dir = child_dir(&attachments, task, &root)?;
    let mut names = Vec::with_capacity(files.len());
    // Names already there (an earlier batch of the same task), in any case: `a.log` and `A.LOG` are one file
    // on some file systems.
    let mut taken: HashSet<String> = rfs::Dir::read_from(&dir)
        .map_err(|e| {
            format!(
                "the attachments folder cannot be read: {}",
                std::io::Error::from(e)
            )
        })?
        .filter_map(|entry| Some(entry.ok()?.file_name().to_str().ok()?.to_lowercase()))
        .collect();
    for f in files {
        let name = loop {
            // A name in use (from an earlier batch of the same task) gets the next number.
            let name = unique(&safe_name(&f.name), &mut taken);
            match write_new(&dir, &name, &f.data) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("{name:?} could not be saved: {e}")),
                Ok(()) => break name,
            }
        };
        names.push(name);
    }
    Ok(Saved {
        dir: format!("{ATTACHMENTS_DIR}/{task}"),
        names,
    })
}

/// Opens the directory `name` in `at` without following a link there.
fn open_dir(at: &OwnedFd, name: &str, root: &Path) -> Result<OwnedFd, String> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rfs::openat(at, name, flags, Mode::empty()).map_err(|e| match e {
        Errno::LOOP | Errno::NOTDIR => format!(
            "{}/{name} is a symbolic link or not a folder: attachments are not written through one \
             (remove it)",
            root.display()
        ),
        e => format!("{}/{name}: {}", root.display(), std::io::Error::from(e)),
    })
}

/// The folder `name` in `parent`: made if missing, refused if it is a link or anything but a folder.
fn child_dir(parent: &OwnedFd, name: &str, root: &Path) -> Result<OwnedFd, String> {
    // mkdirat never follows a link at the last component; one there makes it fail with EEXIST, and the open
    // below refuses it.
    match rfs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => {
            return Err(format!(
                "{}/…/{name}: {}",
                root.display(),
                std::io::Error::from(e)
            ))
        }
    }
    open_dir(parent, name, root)
}

/// Keeps `.codetogether/` out of git without touching the project's own `.gitignore`.
fn ignore_all(ct: &OwnedFd, root: &Path) -> Result<(), String> {
    match write_new(ct, ".gitignore", b"*\n") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("{}/.codetogether/.gitignore: {e}", root.display())),
    }
}

/// Writes a new file in `dir`, never through a link and never over an existing file.
fn write_new(dir: &OwnedFd, name: &str, data: &[u8]) -> std::io::Result<()> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rfs::openat(dir, name, flags, Mode::from_raw_mode(0o600))?;
    let mut f = fs::File::from(fd);
    f.write_all(data)?;
    f.sync_all()
}

/// `name`, or `name (2).ext` and so on when a file of that name (in any case) is there already.
fn unique(name: &str, taken: &mut HashSet<String>) -> String {
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s, format!(".{e}")),
        _ => (name, String::new()),
    };
    let mut candidate = name.to_string();
    let mut n = 2;
    while taken.contains(&candidate.to_lowercase()) {
        candidate = format!("{stem} ({n}){ext}");
        n += 1;
    }
    taken.insert(candidate.to_lowercase());
    candidate
}

/// The user message content for Claude Code: the prompt as text, then each image (small enough) as image
/// content. `None` when there are no images: the prompt goes as plain text, as always.
pub fn content(prompt: &str, files: &[Attachment]) -> Option<Value> {
    use base64::Engine;
    // Images together stay well inside what one request to the Messages API may carry (they stay in the
    // conversation, so an oversized one would fail every later turn too); the rest are files only.
    let mut room = MAX_IMAGES_BYTES;
    let images: Vec<Value> = files
        .iter()
        .filter(|f| f.data.len() <= MAX_IMAGE_BYTES && f.image_type().is_some())
        .filter(|f| match room.checked_sub(f.data.len()) {
            Some(left) => {
                room = left;
                true
            }
            None => false,
        })
        .filter_map(|f| {
            let media_type = f.image_type()?;
            Some(json!({
                "type": "image",
                "source": {
                    "type": "base64",
                    "media_type": media_type,
                    "data": base64::engine::general_purpose::STANDARD.encode(&f.data),
                },
            }))
        })
        .collect();
    if images.is_empty() {
        return None;
    }
    let mut blocks = vec![json!({"type": "text", "text": prompt})];
    blocks.extend(images);
    Some(Value::Array(blocks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ct_protocol::files::parts_of;

    fn file(name: &str, data: &[u8]) -> Attachment {
        Attachment {
            name: name.into(),
            media_type: None,
            data: data.to_vec(),
        }
    }

    #[test]
    fn batches_assemble_and_bounds_hold_whatever_the_parts_claim() {
        let files = vec![file("a.log", b"hello"), file("b", &[7; 600 * 1024])];
        let mut asm = Assembly::default();
        for p in parts_of("t_a", &files) {
            asm.part(p);
        }
        assert_eq!(asm.take("t_a"), Some(Ok(files.clone())));
        assert_eq!(asm.take("t_a"), None);

        // A part past its file's declared size.
        let mut parts = parts_of("t_b", &files[..1]);
        parts[0].size = 2;
        parts.iter().cloned().for_each(|p| asm.part(p));
        assert!(asm.take("t_b").unwrap().is_err());

        // Parts out of order, a missing part, a claimed size over the bound.
        let mut parts = parts_of("t_c", &files[1..]);
        parts.swap(0, 1);
        parts.into_iter().for_each(|p| asm.part(p));
        assert!(asm.take("t_c").unwrap().is_err());
        let parts = parts_of("t_d", &files[1..]);
        asm.part(parts[0].clone());
        assert!(asm.take("t_d").unwrap().is_err());
        let mut huge = parts_of("t_e", &files[..1]);
        huge[0].size = MAX_FILE_BYTES + 1;
        asm.part(huge[0].clone());
        assert!(asm.take("t_e").unwrap().is_err());

        // Pending batches are bounded, and a dropped link drops them.
        for i in 0..MAX_PENDING + 3 {
            asm.part(parts_of(&format!("t_{i}"), &files[..1])[0].clone());
        }
        assert_eq!(asm.pending.len(), MAX_PENDING);
        asm.clear();
        assert!(asm.pending.is_empty());
    }

    #[test]
    fn saved_under_the_task_git_ignored_with_unique_safe_names() {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            file("../../etc/passwd", b"x"),
            file("a.log", b"1"),
            file("A.LOG", b"2"),
            file(".hidden", b"3"),
        ];
        let saved = save(dir.path(), "t_abc", &files).unwrap();
        assert_eq!(saved.dir, ".codetogether/attachments/t_abc");
        assert_eq!(saved.names, ["etc_passwd", "a.log", "A (2).LOG", "hidden"]);
        let at = dir.path().join(".codetogether/attachments/t_abc");
        assert_eq!(fs::read(at.join("A (2).LOG")).unwrap(), b"2");
        assert_eq!(
            fs::read_to_string(dir.path().join(".codetogether/.gitignore")).unwrap(),
            "*\n"
        );
        // A second batch (a follow-up) keeps the first one's files.
        let again = save(dir.path(), "t_abc", &files[1..2]).unwrap();
        assert_eq!(again.names, ["a (3).log"]);
        assert!(save(dir.path(), "../x", &files).is_err());
        assert!(saved.prompt("read it").ends_with(
            "Attached files (in .codetogether/attachments/t_abc/): etc_passwd, a.log, A (2).LOG, hidden"
        ));
    }

    #[test]
    fn a_symlinked_folder_is_never_written_through() {
        let project = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), project.path().join(".codetogether")).unwrap();
        let err = save(project.path(), "t_x", &[file("a", b"1")]).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);

        // Deeper down too, and a file name planted as a symlink is not followed.
        let project = tempfile::tempdir().unwrap();
        fs::create_dir_all(project.path().join(".codetogether")).unwrap();
        std::os::unix::fs::symlink(
            outside.path(),
            project.path().join(".codetogether/attachments"),
        )
        .unwrap();
        assert!(save(project.path(), "t_x", &[file("a", b"1")]).is_err());
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);

        // A link planted where a file is to go is neither followed nor replaced: the file takes another name.
        let project = tempfile::tempdir().unwrap();
        let at = project.path().join(".codetogether/attachments/t_x");
        fs::create_dir_all(&at).unwrap();
        std::os::unix::fs::symlink(outside.path().join("planted"), at.join("a")).unwrap();
        let saved = save(project.path(), "t_x", &[file("a", b"1")]).unwrap();
        assert_eq!(saved.names, ["a (2)"]);
        assert_eq!(fs::read(at.join("a (2)")).unwrap(), b"1");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn images_become_image_content_after_the_text() {
        let png = Attachment {
            name: "shot.png".into(),
            media_type: Some("image/png".into()),
            data: vec![0x89, b'P', b'N', b'G'],
        };
        assert!(content("p", &[file("a.log", b"x")]).is_none());
        let v = content("p", &[file("a.log", b"x"), png]).unwrap();
        assert_eq!(v[0], json!({"type": "text", "text": "p"}));
        assert_eq!(v[1]["type"], "image");
        assert_eq!(v[1]["source"]["media_type"], "image/png");
        assert_eq!(v[1]["source"]["data"], "iVBORw==");
        // Past the total, images are files only.
        let big = |n: u8| Attachment {
            name: format!("{n}.png"),
            media_type: Some("image/png".into()),
            data: vec![n; MAX_IMAGE_BYTES],
        };
        let v = content("p", &[big(1), big(2), big(3), big(4)]).unwrap();
        assert_eq!(
            v.as_array().unwrap().len(),
            1 + MAX_IMAGES_BYTES / MAX_IMAGE_BYTES
        );
    }
}
