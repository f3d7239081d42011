//! Damage below RocksDB's radar: values whose bytes were flipped before RocksDB stored them (so
//! its own block checksums pass) must be refused when the data dir opens, whichever log entry or
//! metadata value they are — and no decoder may panic or return a wrong value on any input.

use openraft::{CommittedLeaderId, EntryPayload, Vote};
use proptest::prelude::*;
use rocksdb::{ColumnFamilyDescriptor, Options, DB};
use surge_raft::codec;
use surge_raft::store::{OpenError, Storage};
use surge_raft::types::{Command, Entry, LogId, NodeId};

const ENTRIES: u64 = 40;

fn entry(index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(2, 1), index),
        payload: EntryPayload::Normal(Command(format!("command {index}").into_bytes())),
    }
}

/// A data dir with a vote, a committed index and `ENTRIES` log entries, written the way the
/// stores write them; returns the raw database closed.
fn formed() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    drop(Storage::open(dir.path()).expect("fresh data dir opens"));
    let db = raw(dir.path());
    let meta = db.cf_handle("meta").expect("meta cf");
    let logs = db.cf_handle("logs").expect("logs cf");
    db.put_cf(
        meta,
        b"vote",
        codec::encode(&Vote::<NodeId>::new_committed(2, 1)),
    )
    .expect("put");
    db.put_cf(
        meta,
        b"committed",
        codec::encode(&Some(LogId::new(CommittedLeaderId::new(2, 1), ENTRIES))),
    )
    .expect("put");
    for i in 1..=ENTRIES {
        db.put_cf(logs, i.to_be_bytes(), codec::encode(&entry(i)))
            .expect("put");
    }
    drop(db);
    dir
}

fn raw(path: &std::path::Path) -> DB {
    let cfs = ["meta", "logs", "snapshot"]
        .into_iter()
        .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    DB::open_cf_descriptors(&Options::default(), path, cfs).expect("raw open")
}

/// Flip one bit of the value at (cf, key), storing the result as a valid RocksDB value.
fn flip(path: &std::path::Path, cf: &str, key: &[u8], byte: usize, bit: u8) {
    let db = raw(path);
    let handle = db.cf_handle(cf).expect("cf");
    let mut v = db.get_cf(handle, key).expect("get").expect("value exists");
    let i = byte % v.len();
    v[i] ^= 1 << (bit % 8);
    db.put_cf(handle, key, v).expect("put");
}

#[test]
fn an_intact_data_dir_opens() {
    let dir = formed();
    Storage::open(dir.path()).expect("intact data dir opens");
}

#[test]
fn a_damaged_entry_anywhere_in_the_log_is_refused_at_start() {
    // The first, a middle and the last entry: all must be caught before Raft reads them.
    for index in [1, ENTRIES / 2, ENTRIES] {
        let dir = formed();
        flip(dir.path(), "logs", &index.to_be_bytes(), 9, 3);
        let err = match Storage::open(dir.path()) {
            Ok(_) => panic!("log entry {index} was damaged, yet the data dir opened"),
            Err(e) => e,
        };
        assert!(matches!(err, OpenError::CorruptEntry { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("log entry {index}")) && text.contains("corrupt"),
            "error does not name the entry: {text}"
        );
    }
}

#[test]
fn damaged_metadata_is_refused_at_start() {
    for (key, what) in [(&b"vote"[..], "vote"), (&b"committed"[..], "committed")] {
        let dir = formed();
        flip(dir.path(), "meta", key, 6, 0);
        let err = Storage::open(dir.path()).err();
        assert!(
            err.as_ref().is_some_and(|e| e.to_string().contains(what)),
            "damaged {what} not refused: {err:?}"
        );
    }
}

#[test]
fn an_entry_stored_under_another_index_is_refused() {
    // A value that decodes fine but sits under the wrong key is as wrong as a flipped bit.
    let dir = formed();
    let db = raw(dir.path());
    let logs = db.cf_handle("logs").expect("logs cf");
    db.put_cf(logs, 7u64.to_be_bytes(), codec::encode(&entry(8)))
        .expect("put");
    drop(db);
    let err = Storage::open(dir.path()).err();
    assert!(
        err.as_ref()
            .is_some_and(|e| e.to_string().contains("log entry 7")),
        "misplaced entry accepted: {err:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes never panic any decoder the stores use; whatever decodes came from a
    /// frame whose checksum matched.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = codec::decode::<Entry>(&bytes);
        let _ = codec::decode::<Vote<NodeId>>(&bytes);
        let _ = codec::decode::<Option<LogId>>(&bytes);
        let _ = codec::from_bytes::<Entry>(&bytes);
        if codec::decode::<Entry>(&bytes).is_ok() {
            prop_assert_eq!(bytes[0], 1);
            prop_assert_eq!(
                u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]),
                crc32fast::hash(&bytes[5..])
            );
        }
    }

    /// Every single-bit flip of a stored entry is an error, never a different entry.
    #[test]
    fn bit_flips_in_entries_are_errors(index in 1u64..1_000_000, byte in 0usize..4096, bit in 0u8..8) {
        let mut bytes = codec::encode(&entry(index));
        let i = byte % bytes.len();
        bytes[i] ^= 1 << bit;
        prop_assert!(codec::decode::<Entry>(&bytes).is_err());
    }
}
