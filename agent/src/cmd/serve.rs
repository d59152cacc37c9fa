//! `agent serve`: the target-side daemon. Accepts agent links and rebuilds each migration into
//! the target QEMU of the VM the source agent names, found on this host.
use std::{net::SocketAddr, path::PathBuf};

use agent::{
    migration::{
        incoming::{Delivery, IncomingPolicy},
        target::{TargetConfig, MAX_SESSIONS},
    },
    serve::serve,
};
use anyhow::Context;
use nas_proto::Endpoint;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A TOML file of these settings, keyed by the long flags' names with `_` for `-`
    /// (`link_listen = "10.0.0.11:7800"`, `qmp_dir = ["/run/nas-agent/qmp"]`); flags given
    /// on the command line win over it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where source agents connect.
    #[arg(long, default_value = "127.0.0.1:7800")]
    pub link_listen: SocketAddr,
    /// Read the NAS here instead of the address the source announces.
    #[arg(long)]
    nas: Option<Endpoint>,
    /// Image files shared with the source hosts live here (repeatable): a migration that
    /// names an export by a path inside one (a raw image both hosts open) reads mapped pages
    /// from that file. Other paths are never opened.
    #[arg(long = "image-dir", value_name = "DIR")]
    image_dirs: Vec<PathBuf>,
    /// TLS towards the NAS (NBD STARTTLS), a credentials directory in QEMU's layout, when it
    /// requires TLS.
    #[arg(long, value_name = "DIR")]
    nas_tls_creds: Option<PathBuf>,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Where target QEMUs' QMP monitors for this agent are, one socket `VM.qmp` per VM
    /// (repeatable): a source naming VM is delivered into that QEMU, which the agent checks
    /// waits for a migration and hands a socket itself. Must be writable by its owner only.
    #[arg(long = "qmp-dir", value_name = "DIR", default_value = DEFAULT_QMP_DIR)]
    qmp_dirs: Vec<PathBuf>,
    /// Deliver VM's migrations to this incoming address (repeatable), where its QEMU listens
    /// because something else issued `migrate-incoming` (a static libvirt-like set-up; the
    /// host daemon also takes one-off registrations: `agent expect`).
    #[arg(long = "expect", value_name = "VM=URI", value_parser = parse_expect)]
    expect: Vec<(String, String)>,
    /// Registered unix incoming sockets may be in this directory (repeatable); without it,
    /// unix sockets are refused.
    #[arg(long = "incoming-dir", value_name = "DIR")]
    incoming_dirs: Vec<PathBuf>,
    /// Registered incoming addresses may be TCP addresses other than loopback too.
    #[arg(long)]
    incoming_any_host: bool,
    #[command(flatten)]
    tls: super::LinkTlsArgs,
    /// With TLS: accept only sources whose certificate names one of these (repeatable;
    /// default: any the CA signed).
    #[arg(long = "tls-allow-source", value_name = "NAME")]
    tls_allow: Vec<String>,
    /// Migrations served at once; a source connecting beyond that is refused.
    #[arg(long, default_value_t = MAX_SESSIONS)]
    max_sessions: usize,
    /// While it serves a migration, run this agent's threads at this nice value, so that a
    /// guest's final iteration does not wait for a CPU here; a value at or above the agent's
    /// own leaves it alone.
    #[arg(long, default_value_t = -10, allow_negative_numbers = true)]
    session_nice: i32,
}

/// Where `agent serve` and `agent daemon` look for target QEMUs' QMP sockets by default.
pub const DEFAULT_QMP_DIR: &str = "/run/nas-agent/qmp";

fn parse_expect(s: &str) -> Result<(String, String), String> {
    let (vm, uri) = s.split_once('=').ok_or("expected VM=URI")?;
    Ok((vm.to_string(), uri.to_string()))
}

impl Args {
    /// The target side's settings; a standing registration its policy refuses is an error.
    pub fn target_config(&self) -> anyhow::Result<TargetConfig> {
        let delivery = Delivery {
            qmp_dirs: self.qmp_dirs.clone(),
            expected: Default::default(),
            policy: IncomingPolicy {
                unix_dirs: self.incoming_dirs.clone(),
                any_host: self.incoming_any_host,
            },
        };
        for (vm, uri) in &self.expect {
            delivery.register(vm, uri, None)?;
        }
        Ok(TargetConfig {
            nas_override: self.nas.clone(),
            nas_tls: nas_client::tls::StorageTls::load(self.nas_tls_creds.as_deref())?,
            image_dirs: self.image_dirs.clone(),
            delivery,
            max_sessions: self.max_sessions,
            session_nice: Some(self.session_nice),
            link_security: self.tls.security(self.tls_allow.clone())?,
            ..TargetConfig::default()
        })
    }

    /// Binds the agent link's listener.
    pub async fn listen(&self) -> anyhow::Result<tokio::net::TcpListener> {
        let listener = tokio::net::TcpListener::bind(self.link_listen)
            .await
            .with_context(|| format!("cannot listen on {}", self.link_listen))?;
        tracing::info!("agent link listening on {}", listener.local_addr()?);
        Ok(listener)
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    super::serve_metrics(args.metrics)?;
    let config = args.target_config()?;
    let listener = args.listen().await?;
    serve(listener, config, super::stop_on_signals()).await?;
    Ok(())
}
