//! The dedup table's write-ahead log: `<store.path>/dedup.wal.<n>`, the records of each commit
//! appended in the slot encoding and made durable with one `fdatasync`.
//!
//! Why a log in front of the table: a commit's records belong in slots all over the table, one
//! 4 KiB page each, and writing and syncing them at every commit cost a system call per record
//! and as many random page writes as records. Appending them to a log is one sequential write;
//! a checkpoint writes many commits' records into the table at once, a page at a time, and
//! then deletes the log.

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
    /// Creates log `seq` (empty), and syncs the directory so that it survives a power loss.
    pub(super) fn create(dir: &Path, seq: u64) -> io::Result<Wal> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path(dir, seq))?;
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

/// Deletes log `seq` if it holds nothing.
pub(super) fn remove_if_empty(dir: &Path, seq: u64) -> io::Result<()> {
    if std::fs::metadata(path(dir, seq))?.len() == 0 {
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
        let mut wal = Wal::create(dir.path(), 3).expect("create");
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
        let mut wal = Wal::create(dir.path(), 1).expect("create");
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
}
