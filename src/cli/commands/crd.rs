//! `dbshift crd`: the DatabaseMigration CustomResourceDefinition, as committed under crds/.

use crate::exit::{Exit, Failure};

pub fn run() -> Result<Exit, Failure> {
    print!("{}", crate::crd::crd_yaml());
    Ok(Exit::Ok)
}
