//! The dedup table's write-ahead log: `<store.path>/dedup.wal.<n>`, the records of each commit
//! appended in the slot encoding and made durable with one `fdatasync`.
//!
//! Why a log in front of the table: a commit's records belong in slots all over the table, one
//! 4 KiB page each, and writing and syncing them at every commit cost a system call per record
//! and as many random page writes as records. Appending them to a log is one sequential write;
//! a checkpoint writes many commits' records into the table at once, a page at a time, and
//! then deletes the log.
//!
//! Why a new log is written full of zeros first: an append that grows a file changes its size,
//! and the `fdatasync` after it must then commit that change to the filesystem's journal as
//! well. Appends over blocks that are already written and counted in the size leave only data
//! to sync, which costs less CPU and returns sooner. The zeros read back as empty slots, so a
//! replay stops at the end of what was appended, as it stops at a torn tail.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::file::{decode_record, encode, SLOT};
use super::KeyHash;

const PREFIX: &str = "dedup.wal.";

/// The log commits append to.
pub(super) struct Wal {
    dir: PathBuf,
    seq: u64,
    file: File,
    len: u64,
}

impl Wal {
    /// Creates log `seq` with room written for `records` appended records (zeros), syncs it
    /// and the directory so that both survive a power loss. Appends past that room grow the
    /// file.
    pub(super) fn create(dir: &Path, seq: u64, records: usize) -> io::Result<Wal> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path(dir, seq))?;
        // Only a saving: on a full disk the log starts empty and grows, as any log past its
        // room does, and zeros written before the failure read as no record.
        if let Err(error) = write_room(&file, records.saturating_mul(SLOT)) {
            tracing::debug!(dir = %dir.display(), seq, %error, "dedup log written without room");
        }
        File::open(dir)?.sync_all()?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            seq,
            file,
            len: 0,
        })
    }

    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    /// Bytes appended so far.
    #[cfg(test)]
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Appends `records` and `fdatasync`s the log.
    pub(super) fn append(&mut self, records: &[(KeyHash, u64)]) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(records.len() * SLOT);
        for (hash, at) in records {
            bytes.extend_from_slice(&encode(hash, *at));
        }
        self.file.write_all_at(&bytes, self.len)?;
        self.file.sync_data()?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// The file, for errors.
    pub(super) fn path(&self) -> PathBuf {
        path(&self.dir, self.seq)
    }
}

/// Writes `bytes` zeros at the start of `file` and syncs them with the file's size.
fn write_room(file: &File, bytes: usize) -> io::Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; bytes.min(1 << 20)];
    let mut at = 0;
    while at < bytes {
        let n = zeros.len().min(bytes - at);
        file.write_all_at(&zeros[..n], at as u64)?;
        at += n;
    }
    file.sync_all()
}

fn path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{seq}"))
}

/// The logs in `dir`, oldest first.
pub(super) fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// The records of log `seq`, in order, up to the first that is not whole (the tail of an append
/// that a crash cut short).
pub(super) fn read(dir: &Path, seq: u64) -> io::Result<Vec<(KeyHash, u64)>> {
    let bytes = std::fs::read(path(dir, seq))?;
    Ok(bytes.chunks_exact(SLOT).map_while(decode_record).collect())
}

/// Deletes log `seq` if it holds no record.
pub(super) fn remove_if_empty(dir: &Path, seq: u64) -> io::Result<()> {
    let mut first = [0u8; SLOT];
    let file = File::open(path(dir, seq))?;
    let read = file.read_at(&mut first, 0)?;
    if read < SLOT || decode_record(&first).is_none() {
        remove(dir, seq)?;
    }
    Ok(())
}

/// Deletes log `seq` (a log already gone is fine).
pub(super) fn remove(dir: &Path, seq: u64) -> io::Result<()> {
    match std::fs::remove_file(path(dir, seq)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_records_read_back_up_to_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::create(dir.path(), 3, 0).expect("create");
        let records = vec![([1u8; 16], 10), ([2u8; 16], 20)];
        wal.append(&records).expect("append");
        wal.append(&[([3u8; 16], 30)]).expect("append");
        assert_eq!(wal.len(), 3 * SLOT as u64);
        // Half a record more, as a crash in the middle of an append leaves it.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(wal.path())
            .expect("open");
        std::io::Write::write_all(&mut file, &encode(&[4u8; 16], 40)[..20]).expect("write");
        assert_eq!(list(dir.path()).expect("list"), vec![3]);
        let read_back = read(dir.path(), 3).expect("read");
        assert_eq!(
            read_back,
            vec![([1u8; 16], 10), ([2u8; 16], 20), ([3u8; 16], 30)]
        );
        remove(dir.path(), 3).expect("remove");
        remove(dir.path(), 3).expect("already gone");
        assert!(list(dir.path()).expect("list").is_empty());
    }

    #[test]
    fn a_damaged_record_ends_the_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::create(dir.path(), 1, 0).expect("create");
        wal.append(&[([1u8; 16], 10), ([2u8; 16], 20), ([3u8; 16], 30)])
            .expect("append");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(wal.path())
            .expect("open");
        file.write_all_at(&[0xFF; 4], SLOT as u64 + 2)
            .expect("damage");
        assert_eq!(read(dir.path(), 1).expect("read"), vec![([1u8; 16], 10)]);
    }

    #[test]
    fn a_log_written_with_room_replays_what_was_appended_and_grows_past_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Wal::create(dir.path(), 7, 4).expect("create");
        let size = |dir: &Path| std::fs::metadata(path(dir, 7)).expect("metadata").len();
        assert_eq!(
            size(dir.path()),
            4 * SLOT as u64,
            "the room is written up front"
        );
        assert!(read(dir.path(), 7).expect("read").is_empty());
        remove_if_empty(dir.path(), 7).expect("remove if empty");
        assert!(
            list(dir.path()).expect("list").is_empty(),
            "zeros are no record"
        );

        drop(wal);
        let mut wal = Wal::create(dir.path(), 8, 4).expect("create");
        wal.append(&[([1u8; 16], 10), ([2u8; 16], 20)])
            .expect("append");
        assert_eq!(
            std::fs::metadata(wal.path()).expect("metadata").len(),
            4 * SLOT as u64,
            "appends within the room do not grow the file"
        );
        // A torn third record inside the room ends the replay, as at the end of a file.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(wal.path())
            .expect("open");
        file.write_all_at(&encode(&[3u8; 16], 30)[..20], wal.len())
            .expect("write");
        assert_eq!(
            read(dir.path(), 8).expect("read"),
            vec![([1u8; 16], 10), ([2u8; 16], 20)]
        );
        wal.append(&[([3u8; 16], 30), ([4u8; 16], 40), ([5u8; 16], 50)])
            .expect("append past the room");
        assert_eq!(
            std::fs::metadata(wal.path()).expect("metadata").len(),
            5 * SLOT as u64
        );
        assert_eq!(read(dir.path(), 8).expect("read").len(), 5);
        remove_if_empty(dir.path(), 8).expect("remove if empty");
        assert_eq!(
            list(dir.path()).expect("list"),
            vec![8],
            "a log with records stays"
        );
    }
}
