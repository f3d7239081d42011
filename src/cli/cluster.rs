//! Cluster commands: `surge status` and `surge members`. Flags and printing; the calls are
//! `surge_client`'s.

use serde_json::{json, Value};
use surge_client::Client;
use surge_harness::output::{json as print_json, table, Output};
use surge_proto::cluster::{AddMemberRequest, Member, RemoveMemberRequest, StatusReply};

fn members_json(members: &[Member]) -> Value {
    members
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "address": m.address,
                "voter": m.voter,
                "reachable": m.reachable,
            })
        })
        .collect()
}

pub fn status_json(s: &StatusReply) -> Value {
    let leader = if s.leader_id == 0 {
        Value::Null
    } else {
        json!({"id": s.leader_id, "address": s.leader_address})
    };
    json!({
        "id": s.id,
        "address": s.address,
        "cluster_id": s.cluster_id,
        "role": s.role,
        "leader": leader,
        "term": s.term,
        "commit_index": s.commit_index,
        "applied_index": s.applied_index,
        "last_log_index": s.last_log_index,
        "purged_index": s.purged_index,
        "snapshot_index": s.snapshot_index,
        "state_hash": s.state_hash,
        "members": members_json(&s.members),
    })
}

fn print_members(members: &[Member]) {
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.address.clone(),
                if m.voter { "voter" } else { "learner" }.to_string(),
                if m.reachable { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    table(&["ID", "ADDRESS", "KIND", "REACHABLE"], &rows);
}

pub async fn status(c: &Client, output: Output) -> anyhow::Result<()> {
    let s = c.status().await?;
    match output {
        Output::Json => print_json(&status_json(&s)),
        Output::Table => {
            let leader = if s.leader_id == 0 {
                "none".to_string()
            } else {
                format!("{} ({})", s.leader_id, s.leader_address)
            };
            println!("cluster   {}", s.cluster_id);
            println!("replica   {} at {} ({})", s.id, s.address, s.role);
            println!("leader    {leader}");
            println!("term      {}", s.term);
            println!(
                "log       commit {}  applied {}  last {}  snapshot {}  purged {}",
                s.commit_index, s.applied_index, s.last_log_index, s.snapshot_index, s.purged_index
            );
            println!();
            print_members(&s.members);
        }
    }
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum MembersCmd {
    /// List the replicas.
    List,
    /// Add a replica (it must be running, started with --join or without a cluster).
    Add {
        id: u64,
        address: String,
        /// Keep it a non-voting learner.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a replica.
    Remove { id: u64 },
}

pub async fn members(c: &Client, output: Output, action: MembersCmd) -> anyhow::Result<()> {
    let members = match action {
        MembersCmd::List => c.status().await?.members,
        MembersCmd::Add {
            id,
            address,
            learner,
        } => {
            c.add_member(AddMemberRequest {
                id,
                address,
                voter: !learner,
            })
            .await?
            .members
        }
        MembersCmd::Remove { id } => c.remove_member(RemoveMemberRequest { id }).await?.members,
    };
    match output {
        Output::Json => print_json(&members_json(&members)),
        Output::Table => print_members(&members),
    }
    Ok(())
}
