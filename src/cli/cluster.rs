//! The Kubernetes side of the command line (`approve`, `suspend`, `resume`, `wait`, and the
//! kubectl plugin): which DatabaseMigration, named as kubectl names it (`-n`, `--context`,
//! `--kubeconfig`), and a client for it.

use clap::Args;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::crd::DatabaseMigration;
use crate::exit::{Exit, Failure};

/// One DatabaseMigration.
#[derive(Args, Debug, Clone)]
pub struct ResourceArgs {
    /// The DatabaseMigration.
    pub name: String,
    /// Its namespace (default: the kubeconfig context's, or the pod's in a cluster).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// The kubeconfig context to use (default: the current one).
    #[arg(long)]
    pub context: Option<String>,
    /// The kubeconfig file (default: `KUBECONFIG`, then `~/.kube/config`).
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
}

/// A client as kubectl would make it: the kubeconfig (`file`, else `KUBECONFIG` or
/// `~/.kube/config`) with `context`, else the pod's service account.
pub async fn client(context: Option<&str>, file: Option<&std::path::Path>) -> Result<Client, Failure> {
    let unreachable = |e: String| Failure::new(Exit::Unreachable, format!("cannot configure a Kubernetes client: {e}"));
    let config = match (context, file) {
        (None, None) => Config::infer().await.map_err(|e| unreachable(e.to_string()))?,
        _ => {
            let options = KubeConfigOptions { context: context.map(str::to_string), ..Default::default() };
            let kubeconfig = match file {
                Some(f) => Kubeconfig::read_from(f),
                None => Kubeconfig::read(),
            }
            .map_err(|e| unreachable(e.to_string()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options).await.map_err(|e| unreachable(e.to_string()))?
        }
    };
    Client::try_from(config).map_err(|e| unreachable(e.to_string()))
}

/// The API of the resource's namespace, and the namespace.
pub async fn api(a: &ResourceArgs) -> Result<(Api<DatabaseMigration>, String), Failure> {
    let client = client(a.context.as_deref(), a.kubeconfig.as_deref()).await?;
    let ns = a.namespace.clone().unwrap_or_else(|| client.default_namespace().to_string());
    Ok((Api::namespaced(client, &ns), ns))
}

/// The resource, or a failure that says it is not there.
pub async fn get(api: &Api<DatabaseMigration>, ns: &str, name: &str) -> Result<DatabaseMigration, Failure> {
    match api.get_opt(name).await {
        Ok(Some(d)) => Ok(d),
        Ok(None) => Err(Failure::invalid(format!("no DatabaseMigration {ns}/{name}"))),
        Err(e) => Err(api_failure(&format!("reading DatabaseMigration {ns}/{name}"), e)),
    }
}

/// A refused or failed API request, for the user.
pub fn api_failure(doing: &str, e: kube::Error) -> Failure {
    match &e {
        kube::Error::Api(s) if s.code == 403 => Failure::invalid(format!("{doing}: not allowed: {}", s.message)),
        kube::Error::Api(s) if (400..500).contains(&s.code) => Failure::invalid(format!("{doing}: {}", s.message)),
        _ => Failure::new(Exit::Unreachable, format!("{doing}: {e}")),
    }
}
