//! Where the CA state lives: the flags every `citadel ca` subcommand shares (the server's
//! state directory, or its journal Secret), and opening that store.

use std::path::PathBuf;

use crate::store::file::FileStore;
use crate::store::Store;

/// Where the CA state lives: the flags every `citadel ca` subcommand shares.
#[derive(Debug, clap::Args)]
pub struct StateArgs {
    /// The server's state directory (--store file).
    #[arg(long, default_value = "citadel-data", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Where the server keeps its state: a directory, or Secrets (--store kube).
    #[arg(long, value_enum, default_value_t = super::serve::StoreKind::File)]
    pub store: super::serve::StoreKind,
    /// citadel's namespace with --store kube.
    #[arg(long, default_value = "istio-system", value_name = "NS")]
    pub namespace: String,
    /// kubeconfig with --store kube; default KUBECONFIG, ~/.kube/config or in-cluster.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
}

impl StateArgs {
    pub(crate) fn describe(&self) -> String {
        match self.store {
            super::serve::StoreKind::File => self.state_dir.display().to_string(),
            super::serve::StoreKind::Kube => format!(
                "Secret {}/{}",
                self.namespace,
                crate::store::kube::JOURNAL_SECRET
            ),
        }
    }

    /// The store the server uses, for reading and compare-and-swap writes.
    pub async fn open(&self) -> Result<std::sync::Arc<dyn Store>, String> {
        match self.store {
            super::serve::StoreKind::File => {
                if !self.state_dir.exists() {
                    return Err(format!(
                        "state directory {} does not exist; start `citadel serve --state-dir {}` first",
                        self.state_dir.display(),
                        self.state_dir.display()
                    ));
                }
                Ok(std::sync::Arc::new(
                    FileStore::open(&self.state_dir).map_err(|e| e.to_string())?,
                ))
            }
            super::serve::StoreKind::Kube => {
                let client = crate::cluster::client(self.kubeconfig.as_deref()).await?;
                Ok(std::sync::Arc::new(crate::store::kube::KubeStore::new(
                    client,
                    &self.namespace,
                    None,
                )))
            }
        }
    }
}
