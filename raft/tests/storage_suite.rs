//! openraft's own storage conformance suite, run against the RocksDB log and state-machine stores.

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use surge_raft::metrics::RaftMetrics;
use surge_raft::store::{LogStore, StateMachineStore, Storage};
use surge_raft::types::{StorageError, TypeConfig};
use surge_raft::StateMachine;

/// A minimal application: it remembers every command it applied, in order.
#[derive(Default)]
struct Journal(Vec<(u64, Vec<u8>)>);

impl StateMachine for Journal {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        self.0.push((index, command.to_vec()));
        index.to_le_bytes().to_vec()
    }
    fn snapshot(&self) -> Vec<u8> {
        surge_raft::codec::to_bytes(&self.0)
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), surge_raft::RestoreError> {
        self.0 =
            surge_raft::codec::from_bytes(snapshot).map_err(|source| surge_raft::RestoreError {
                what: "test state",
                source,
            })?;
        Ok(())
    }
    fn state_hash(&self) -> String {
        format!("{}", self.0.len())
    }
}

/// Builds the stores on a fresh RocksDB; `background_flush` picks the server's flusher thread
/// instead of syncing inside `append`.
struct RocksBuilder {
    background_flush: bool,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore<Journal>, tempfile::TempDir>
    for RocksBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore<Journal>), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = Storage::open(dir.path()).expect("open rocksdb");
        let metrics = Arc::new(RaftMetrics::new(&prometheus::Registry::new()).expect("metrics"));
        let (sm, _, _) = StateMachineStore::open(storage.clone(), Journal::default(), metrics)
            .expect("open state machine");
        let log = if self.background_flush {
            LogStore::with_background_flush(storage).expect("start the flusher")
        } else {
            LogStore::new(storage)
        };
        Ok((dir, log, sm))
    }
}

#[test]
fn rocksdb_stores_pass_openraft_suite() {
    Suite::test_all(RocksBuilder {
        background_flush: false,
    })
    .expect("openraft storage suite");
}

#[test]
fn rocksdb_stores_with_the_flusher_thread_pass_openraft_suite() {
    Suite::test_all(RocksBuilder {
        background_flush: true,
    })
    .expect("openraft storage suite, background flush");
}

#[test]
fn snapshot_survives_reopen_and_damage_is_refused() {
    use openraft::storage::RaftStateMachine;
    use openraft::RaftSnapshotBuilder;

    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let metrics = || Arc::new(RaftMetrics::new(&prometheus::Registry::new()).expect("metrics"));
    rt.block_on(async {
        let storage = Storage::open(dir.path()).expect("open");
        let mut app = Journal::default();
        app.apply(1, b"one");
        app.apply(2, b"two");
        let (mut sm, _, _) = StateMachineStore::open(storage, app, metrics()).expect("sm");
        let mut builder = sm.get_snapshot_builder().await;
        builder.build_snapshot().await.expect("snapshot");
    });
    {
        let storage = Storage::open(dir.path()).expect("reopen");
        let (_, state, _) =
            StateMachineStore::open(storage, Journal::default(), metrics()).expect("sm");
        let state = state.read().expect("lock");
        assert_eq!(
            state.app.0,
            vec![(1, b"one".to_vec()), (2, b"two".to_vec())]
        );
    }
    // Flip one byte of the stored snapshot value inside RocksDB's files: at the next open either
    // RocksDB's block checksum or our frame checksum must refuse it.
    let mut damaged = false;
    for entry in std::fs::read_dir(dir.path()).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "log" || e == "sst") {
            let mut bytes = std::fs::read(&path).expect("read");
            if let Some(pos) = bytes.windows(3).position(|w| w == b"two") {
                bytes[pos] ^= 0x20;
                std::fs::write(&path, bytes).expect("write");
                damaged = true;
            }
        }
    }
    assert!(damaged, "test did not find the snapshot bytes to damage");
    let err = match Storage::open(dir.path()) {
        Err(e) => e.to_string(),
        Ok(storage) => match StateMachineStore::open(storage, Journal::default(), metrics()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("damaged snapshot was accepted"),
        },
    };
    assert!(
        err.contains("corrupt") || err.contains("Corruption") || err.contains("checksum"),
        "{err}"
    );
}
