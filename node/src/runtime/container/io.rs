//! Exec and files of a container sandbox ([`SandboxIo`]).
//!
//! Not built yet: every call says so. (Being built: see the "Exec and files" section of
//! docs/ARCHITECTURE.md.)

use bytes::Bytes;
use tokio::sync::mpsc;

use super::ContainerRuntime;
use crate::runtime::io::{
    ExecControl, ExecOutput, ExecSpec, ExecStatus, IoError, Listing, SandboxIo, UploadStats,
    WriteSpec,
};
use crate::runtime::SandboxId;

impl SandboxIo for ContainerRuntime {
    async fn exec(
        &self,
        _id: SandboxId,
        _spec: ExecSpec,
        _control: mpsc::Receiver<ExecControl>,
        _out: mpsc::Sender<ExecOutput>,
    ) -> Result<ExecStatus, IoError> {
        Err(IoError::Unsupported("exec"))
    }

    async fn read_file(
        &self,
        _id: SandboxId,
        _path: String,
        _out: mpsc::Sender<Bytes>,
    ) -> Result<u64, IoError> {
        Err(IoError::Unsupported("reading files"))
    }

    async fn write_file(
        &self,
        _id: SandboxId,
        _spec: WriteSpec,
        _data: mpsc::Receiver<Bytes>,
    ) -> Result<u64, IoError> {
        Err(IoError::Unsupported("writing files"))
    }

    async fn list_dir(&self, _id: SandboxId, _path: String) -> Result<Listing, IoError> {
        Err(IoError::Unsupported("listing directories"))
    }

    async fn download(
        &self,
        _id: SandboxId,
        _path: String,
        _out: mpsc::Sender<Bytes>,
    ) -> Result<u64, IoError> {
        Err(IoError::Unsupported("downloads"))
    }

    async fn upload(
        &self,
        _id: SandboxId,
        _path: String,
        _data: mpsc::Receiver<Bytes>,
    ) -> Result<UploadStats, IoError> {
        Err(IoError::Unsupported("uploads"))
    }
}
