//! Process exit codes: what every command returns, and what a runner pod's exit tells the
//! controller (a Job's pod-failure policy and the result's `code` use the same numbers).

/// Exit codes (see `dbshift --help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Exit {
    Ok = 0,
    /// A migration or check failed; its changes were undone.
    Failed = 1,
    /// Invalid input: files, arguments, resources, an applied migration that was edited.
    Invalid = 2,
    /// MongoDB unreachable or erroring.
    Unreachable = 3,
    /// A tenant is locked by another runner.
    Locked = 4,
    /// An undo was incomplete: the database needs attention.
    NeedsAttention = 5,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The exit of a code written by a runner (unknown codes need attention).
    pub fn from_code(code: u8) -> Exit {
        match code {
            0 => Exit::Ok,
            1 => Exit::Failed,
            2 => Exit::Invalid,
            3 => Exit::Unreachable,
            4 => Exit::Locked,
            _ => Exit::NeedsAttention,
        }
    }

    /// How serious it is, for picking the worst of several tenants' exits.
    fn severity(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failed => 1,
            Exit::Locked => 2,
            Exit::Invalid => 3,
            Exit::Unreachable => 4,
            Exit::NeedsAttention => 5,
        }
    }

    /// The most serious of several exits (`Ok` for none).
    pub fn worst(exits: impl IntoIterator<Item = Exit>) -> Exit {
        exits.into_iter().max_by_key(|e| e.severity()).unwrap_or(Exit::Ok)
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}
