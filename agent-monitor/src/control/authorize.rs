//! Who may ask the daemon what.

use super::Request;

/// Why the daemon refused a request; sent to the caller and reported, word for word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the caller is itself a process of agent {agent} (task {task}); from inside an agent `run --user` cannot bind uid {uid}: binding a uid makes every process of it on the host an agent"
    )]
    BindUidFromInside {
        agent: String,
        task: String,
        uid: u32,
    },
    #[error(
        "the caller is itself a process of agent {agent} (task {task}); from inside an agent only `task end` or `task narrow` of --agent {agent} --task {task} is allowed, never widening a task or touching another agent"
    )]
    OutsideOwnTask { agent: String, task: String },
    #[error("the control socket is for root and members of the daemon's --admin-group")]
    NotAdmin,
}

/// Who may do what on the control socket. `admin`: root or a member of the admin group.
/// `inside`: the (agent, task) the calling process itself belongs to, if it is an agent process.
///
/// A process inside an agent may only end or narrow its own task (or `run` again into exactly its
/// own task, which changes nothing) — even as root: otherwise an agent could start a task with wider
/// grants, switch to another agent's allowlist, or end another agent's work.
pub fn authorize(
    request: &Request,
    admin: bool,
    inside: Option<(&str, &str)>,
) -> Result<(), Refusal> {
    // `run` reports from inside its agent; the daemon accepts a report only from a `run` it
    // placed (see `Monitor::on_caught`), whatever the caller's rights; its ask channel likewise.
    if let Request::Caught(_) | Request::AskChannel { .. } | Request::CaughtChannel {} = request {
        return Ok(());
    }
    if let Some((agent, task)) = inside {
        let own = request.target() == Some((agent, task));
        if let Request::Place {
            user: Some(uid), ..
        } = request
        {
            return Err(Refusal::BindUidFromInside {
                agent: agent.to_string(),
                task: task.to_string(),
                uid: *uid,
            });
        }
        return match request {
            Request::TaskEnd { .. } | Request::TaskNarrow { .. } | Request::Place { .. } if own => {
                Ok(())
            }
            _ => Err(Refusal::OutsideOwnTask {
                agent: agent.to_string(),
                task: task.to_string(),
            }),
        };
    }
    if admin {
        Ok(())
    } else {
        Err(Refusal::NotAdmin)
    }
}
