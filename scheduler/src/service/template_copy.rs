//! `surge snapshot` and `surge template copy` on the replicas.
//!
//! Both are direct node calls, not Raft commands: a template is files on a node, and the
//! replicated state learns of a new one the way it learns of an imported one — the node's
//! template rescan re-registers it with its templates (`NodeApi.RegisterNode`), which placement
//! locality and `surge nodes` read. A command through the log would add a write and a
//! round-trip to the watch stream for a change whose effect is already replicated that way,
//! and the bytes must flow node to node regardless.
//!
//! A snapshot is routed like exec (the caller must see the sandbox's job: same tenant, or
//! admin). A copy is planned here from this replica's applied state ([`plan_copy`], pure): the
//! source is a ready node that holds the template, the targets are the nodes named, or the
//! ready nodes with the labels that lack it; then each target is asked to `Pull` from the
//! source, [`COPIES_AT_ONCE`] at a time. Template bytes never pass through a replica.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use surge_proto::sandbox as pb;
use surge_proto::sandbox::template_transfer_client::TemplateTransferClient;
use tonic::Status;

use super::io_proxy::IoProxy;
use crate::model::{Node, NodeState};

/// How a copy's reply says a target needed no copy (`surge template copy` counts it as done).
pub const ALREADY_HOLDS: &str = "already holds template";
/// Targets one copy call may name or select.
pub const COPY_TARGETS_MAX: usize = 1024;
/// Pulls the replica keeps in flight for one copy call (each target node also caps what it
/// receives at once, and the source what it sends).
pub const COPIES_AT_ONCE: usize = 4;
/// Longest one target's pull may take, end to end (the node's own limit is 15 minutes).
const PULL_CALL_TIMEOUT: Duration = Duration::from_secs(960);

/// A node as a copy needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub node_id: String,
    pub address: String,
}

/// What a copy will do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyPlan {
    pub source: Endpoint,
    pub targets: Vec<Endpoint>,
    /// Nodes named that need no copy, and why.
    pub skipped: Vec<(String, String)>,
}

/// Why a copy cannot be planned: (gRPC code, message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyRefused {
    Invalid(String),
    NotFound(String),
    Unavailable(String),
}

impl From<CopyRefused> for Status {
    fn from(r: CopyRefused) -> Status {
        match r {
            CopyRefused::Invalid(m) => Status::invalid_argument(m),
            CopyRefused::NotFound(m) => Status::not_found(m),
            CopyRefused::Unavailable(m) => Status::failed_precondition(m),
        }
    }
}

fn holds(node: &Node, template: &str) -> bool {
    node.spec.templates.iter().any(|t| t == template)
}

fn reachable(node: &Node) -> bool {
    node.state == NodeState::Ready && !node.spec.address.is_empty()
}

fn endpoint(node: &Node) -> Endpoint {
    Endpoint {
        node_id: node.spec.id.clone(),
        address: node.spec.address.clone(),
    }
}

/// Plan a copy from the nodes as this replica knows them (pure; see the module docs).
pub fn plan_copy(
    nodes: &BTreeMap<String, Node>,
    req: &pb::CopyTemplateRequest,
) -> Result<CopyPlan, CopyRefused> {
    let name = &req.template;
    crate::validate::name("template", name).map_err(|e| CopyRefused::Invalid(e.to_string()))?;
    let by_selector = !req.labels.is_empty() || req.count > 0;
    if req.to.is_empty() != by_selector {
        return Err(CopyRefused::Invalid(if req.to.is_empty() {
            "say where to copy: --to NODE, or --label k=v and/or --count N".into()
        } else {
            "give either --to NODE or --label/--count, not both".into()
        }));
    }
    if req.to.len() > COPY_TARGETS_MAX
        || usize::try_from(req.count).unwrap_or(usize::MAX) > COPY_TARGETS_MAX
    {
        return Err(CopyRefused::Invalid(format!(
            "at most {COPY_TARGETS_MAX} target nodes per copy"
        )));
    }
    let source = if req.source.is_empty() {
        nodes
            .values()
            .find(|n| reachable(n) && holds(n, name))
            .ok_or_else(|| {
                CopyRefused::Unavailable(format!(
                    "no ready node holds template {name} (surge nodes lists each node's templates)"
                ))
            })?
    } else {
        let n = nodes
            .get(&req.source)
            .ok_or_else(|| CopyRefused::NotFound(format!("no node {}", req.source)))?;
        if !holds(n, name) {
            return Err(CopyRefused::Unavailable(format!(
                "node {} does not hold template {name}",
                req.source
            )));
        }
        if !reachable(n) {
            return Err(CopyRefused::Unavailable(format!(
                "node {} is {} or serves no node calls (no --listen address); pick another source",
                req.source,
                n.state.as_str()
            )));
        }
        n
    };
    let mut plan = CopyPlan {
        source: endpoint(source),
        targets: Vec::new(),
        skipped: Vec::new(),
    };
    if by_selector {
        let limit = if req.count == 0 {
            COPY_TARGETS_MAX
        } else {
            usize::try_from(req.count).unwrap_or(COPY_TARGETS_MAX)
        };
        plan.targets = nodes
            .values()
            .filter(|n| reachable(n) && !holds(n, name))
            .filter(|n| {
                req.labels
                    .iter()
                    .all(|(k, v)| n.spec.labels.get(k) == Some(v))
            })
            .take(limit)
            .map(endpoint)
            .collect();
        return Ok(plan);
    }
    let mut seen = std::collections::BTreeSet::new();
    for id in &req.to {
        if !seen.insert(id.as_str()) {
            continue;
        }
        let n = nodes
            .get(id)
            .ok_or_else(|| CopyRefused::NotFound(format!("no node {id}")))?;
        if holds(n, name) {
            plan.skipped
                .push((id.clone(), format!("{ALREADY_HOLDS} {name}")));
        } else if !reachable(n) {
            return Err(CopyRefused::Unavailable(format!(
                "node {id} is {} or serves no node calls (no --listen address)",
                n.state.as_str()
            )));
        } else {
            plan.targets.push(endpoint(n));
        }
    }
    Ok(plan)
}

impl IoProxy {
    /// Carry out a planned copy: each target pulls from the source.
    pub async fn run_copy(
        &self,
        req: pb::CopyTemplateRequest,
    ) -> Result<pb::CopyTemplateReply, Status> {
        let plan = self
            .replica()
            .read(|s, _| plan_copy(&s.nodes, &req))
            .map_err(Status::from)?;
        let source = plan.source.clone();
        let template = req.template.clone();
        let pulls = plan.targets.into_iter().map(|target| {
            let (source, template) = (source.clone(), template.clone());
            let held = format!("{ALREADY_HOLDS} {template}");
            async move {
                let pulled = match self.transfer(&target.address) {
                    Ok(mut client) => {
                        let call = client.pull(pb::PullTemplateRequest {
                            node_id: target.node_id.clone(),
                            template,
                            source_node_id: source.node_id,
                            source_address: source.address,
                        });
                        match tokio::time::timeout(PULL_CALL_TIMEOUT, call).await {
                            Ok(r) => r.map(tonic::Response::into_inner),
                            Err(_) => Err(Status::deadline_exceeded("the copy took too long")),
                        }
                    }
                    Err(s) => Err(s),
                };
                match pulled {
                    Ok(r) => pb::TemplateCopy {
                        node_id: target.node_id,
                        error: String::new(),
                        bytes: r.bytes,
                        duration_ms: r.duration_ms,
                        sha256: r.sha256.iter().map(|b| format!("{b:02x}")).collect(),
                    },
                    // Copied by an earlier call that this replica's state does not show yet
                    // (the node re-registers its templates within seconds).
                    Err(s) if s.code() == tonic::Code::AlreadyExists => pb::TemplateCopy {
                        node_id: target.node_id,
                        error: held,
                        ..Default::default()
                    },
                    Err(s) => pb::TemplateCopy {
                        node_id: target.node_id,
                        error: s.message().to_owned(),
                        ..Default::default()
                    },
                }
            }
        });
        let mut copies: Vec<pb::TemplateCopy> = futures::stream::iter(pulls)
            .buffer_unordered(COPIES_AT_ONCE)
            .collect()
            .await;
        copies.extend(
            plan.skipped
                .into_iter()
                .map(|(node_id, why)| pb::TemplateCopy {
                    node_id,
                    error: why,
                    ..Default::default()
                }),
        );
        copies.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(pb::CopyTemplateReply {
            source: source.node_id,
            copies,
        })
    }

    fn transfer(
        &self,
        address: &str,
    ) -> Result<TemplateTransferClient<tonic::transport::Channel>, Status> {
        Ok(TemplateTransferClient::new(self.channel(address)?)
            .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX))
    }
}

#[cfg(test)]
mod tests;
