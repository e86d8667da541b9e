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

/// A failure for the user: what went wrong, in a sentence that names what to fix, and the
/// exit code it means. Every error of the engine, the snapshots and the tenant selection maps
/// to one here, in one place.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure { exit, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Failure::new(Exit::Invalid, message)
    }
}

impl From<crate::engine::loader::LoadError> for Failure {
    fn from(e: crate::engine::loader::LoadError) -> Self {
        Failure::invalid(e.to_string().trim_end().to_string())
    }
}

impl From<crate::tenants::TenantError> for Failure {
    fn from(e: crate::tenants::TenantError) -> Self {
        let exit = match e {
            crate::tenants::TenantError::List(_) => Exit::Unreachable,
            _ => Exit::Invalid,
        };
        Failure::new(exit, e.to_string())
    }
}

impl From<crate::mongo::ConnectError> for Failure {
    fn from(e: crate::mongo::ConnectError) -> Self {
        match e {
            crate::mongo::ConnectError::Invalid(m) => Failure::new(Exit::Invalid, m),
            crate::mongo::ConnectError::Unreachable(m) => Failure::new(Exit::Unreachable, m),
        }
    }
}

impl From<crate::engine::runner::RunError> for Failure {
    fn from(e: crate::engine::runner::RunError) -> Self {
        use crate::engine::lock::LockError;
        use crate::engine::ops::ExecError;
        use crate::engine::runner::RunError;
        let exit = match &e {
            RunError::Plan(_) => Exit::Invalid,
            RunError::Lock(LockError::Held { .. }) => Exit::Locked,
            RunError::Lock(LockError::Mongo(_)) | RunError::Mongo { .. } => Exit::Unreachable,
            RunError::Exec(ExecError::Mongo { .. }) => Exit::Unreachable,
            RunError::Exec(_) => Exit::Failed,
            // A hook that says how it failed keeps its exit code.
            RunError::BeforeChange(hook) => match hook.downcast_ref::<Failure>() {
                Some(f) => return f.clone(),
                None => Exit::Failed,
            },
        };
        Failure::new(exit, e.to_string())
    }
}

impl From<crate::backup::BackupError> for Failure {
    fn from(e: crate::backup::BackupError) -> Self {
        use crate::backup::BackupError;
        let exit = match &e {
            BackupError::Mongo { .. } => Exit::Unreachable,
            BackupError::Invalid(_) | BackupError::Io { .. } => Exit::Invalid,
            BackupError::Verify(_) => Exit::NeedsAttention,
        };
        Failure::new(exit, e.to_string())
    }
}
