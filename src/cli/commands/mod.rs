//! One file per subcommand.

pub mod approve;
pub mod backup;
pub mod baseline;
pub mod controller;
pub mod crd;
pub mod down;
pub mod import;
pub mod lint;
pub mod new;
pub mod restore;
pub mod run;
pub mod schema;
pub mod snapshots;
pub mod status;
pub mod suspend;
pub mod up;
pub mod validate;
pub mod wait;
