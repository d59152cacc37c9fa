//! A plain QEMU-to-QEMU migration, the baseline every agent migration is compared with.
use std::time::{Duration, Instant};

use agent::qmp::Qmp;
use serde_json::{json, Value};

/// Migrates from the QEMU of `src` to that of `dst` (started with `-incoming defer`) over
/// loopback TCP, with whatever migration parameters the source has; `via`, given the port the
/// target listens on, may return another port to send to (a relay). Returns the source's
/// final `query-migrate` once the target runs. Events stay in both sessions.
pub async fn plain_migrate(
    src: &mut Qmp,
    dst: &mut Qmp,
    via: Option<&dyn Fn(u16) -> Result<u16, String>>,
) -> Result<Value, String> {
    let port = crate::free_port();
    let e = |what: &str, err: agent::qmp::QmpError| format!("{what}: {err}");
    dst.execute(
        "migrate-incoming",
        Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })),
    )
    .await
    .map_err(|err| e("migrate-incoming", err))?;
    let port = match via {
        Some(relay) => relay(port)?,
        None => port,
    };
    src.execute(
        "migrate",
        Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })),
    )
    .await
    .map_err(|err| e("migrate", err))?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let info = loop {
        let info = src
            .execute("query-migrate", None)
            .await
            .map_err(|err| e("query-migrate", err))?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => {
                return Err(format!("plain migration failed: {info}"))
            }
            _ if Instant::now() > deadline => return Err("plain migration did not finish".into()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    // The target runs by itself once it has loaded the stream; its RESUME event comes first.
    loop {
        let state = dst.status().await.map_err(|err| e("query-status", err))?;
        if state == "running" {
            return Ok(info);
        }
        if Instant::now() > deadline {
            return Err("the target did not start running".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
