//! `cargo xtask bench migration`: plain QEMU, QEMU multifd+zstd and the agents, each migrating
//! the same kind of guest (512 MiB, 200 MiB of its disk read) over a link limited to 1 Gbit/s
//! (a rate-limiting loopback relay), in one run. Then the agents' link bytes against the ideal
//! computed offline from the recorded stream and the disk image.
//!
//! For the plain runs the relay sits between the two QEMUs; for the agents it sits between the
//! source agent and the target agent (QEMU to the local agent is host-local). QEMU's own
//! bandwidth cap is lifted everywhere so the link is the only limit.
use std::{
    collections::HashSet,
    process::{Command, Stdio},
    sync::atomic::Ordering,
};

use agent::migration::stream::{Sink, StreamParser, PAGE_SIZE};
use anyhow::Context;
use serde_json::{json, Value};

use crate::{
    guest,
    lab::{self, plain_migration, Lab, Pair, AGENT_PORT, INDEX_PORT, NBD_PORT},
    relay::Relay,
    sh,
};

/// 1 Gbit/s in bytes per second.
const LINK: u64 = 125_000_000;
/// A MAPPED frame on the link: length, type, seq, export, offset, hash.
const MAPPED_FRAME: u64 = 4 + 1 + 8 + 4 + 8 + 32;
const UNCAPPED: u64 = 100_000_000_000;

struct Row {
    name: &'static str,
    wire: u64,
    total_ms: u64,
    downtime_ms: u64,
}

pub fn run(mem_mb: u32, read_mb: u32) -> anyhow::Result<()> {
    guest::build()?;
    sh::run(sh::cargo().args(["build", "--release", "-p", "agent", "-p", "nas-server"]))?;
    let dir = sh::workspace_root().join("target/xtask/bench-migration");
    let lab = Lab::start(&dir)?;
    let uri = lab.disk_uri();
    let rt = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();

    for (name, multifd, limited) in [
        ("plain QEMU", false, true),
        ("QEMU multifd+zstd", true, true),
        ("plain QEMU, no link limit (QEMU's own rate)", false, false),
    ] {
        let pair = Pair::boot(
            &dir,
            if multifd { "multifd" } else { "plain" },
            &uri,
            mem_mb,
            read_mb,
        )?;
        let relay_bytes = std::cell::RefCell::new(None);
        let info = rt.block_on(async {
            let mut src = pair.source.qmp().await;
            let mut dst = pair.target.qmp().await;
            src.execute(
                "migrate-set-parameters",
                Some(json!({ "max-bandwidth": UNCAPPED })),
            )
            .await?;
            if multifd {
                for q in [&mut src, &mut dst] {
                    q.execute(
                        "migrate-set-capabilities",
                        Some(
                            json!({ "capabilities": [{ "capability": "multifd", "state": true }] }),
                        ),
                    )
                    .await?;
                    q.execute(
                        "migrate-set-parameters",
                        Some(json!({ "multifd-compression": "zstd", "multifd-channels": 2 })),
                    )
                    .await?;
                }
            }
            drop((src, dst));
            let via = |port: u16| -> anyhow::Result<u16> {
                let relay = Relay::start(port, LINK)?;
                let p = relay.port;
                *relay_bytes.borrow_mut() = Some(relay.bytes);
                Ok(p)
            };
            let via: &dyn Fn(u16) -> anyhow::Result<u16> = &via;
            plain_migration(&pair, limited.then_some(via)).await
        })?;
        anyhow::ensure!(pair.verify(), "{name}: the target guest did not carry on");
        let wire = relay_bytes.borrow().as_ref().map_or_else(
            || info["ram"]["transferred"].as_u64().unwrap_or(0),
            |b| b.load(Ordering::Relaxed),
        );
        rows.push(Row {
            name,
            wire,
            total_ms: info["total-time"].as_u64().unwrap_or(0),
            downtime_ms: info["downtime"].as_u64().unwrap_or(0),
        });
    }

    let mut report = Value::Null;
    for limited in [false, true] {
        let tag = if limited {
            "agents"
        } else {
            "agents-unlimited"
        };
        let pair = Pair::boot(&dir, tag, &uri, mem_mb, read_mb)?;
        let relay = if limited {
            Some(Relay::start(AGENT_PORT, LINK)?)
        } else {
            None
        };
        let target_port = relay.as_ref().map_or(AGENT_PORT, |r| r.port);
        let stream = dir.join(format!("{tag}-stream.bin"));
        let mut agent = Command::new(lab::release_bin("agent"));
        agent.arg("migrate");
        if !limited {
            // QEMU's exact stream, for the offline ideal. Not in the timed run: writing it
            // costs the source agent CPU that plain QEMU does not spend.
            agent.arg("--record").arg(&stream);
        }
        let out = agent
            .arg("--source-qmp")
            .arg(&pair.source.qmp_path)
            .arg("--target-qmp")
            .arg(&pair.target.qmp_path)
            .args(["--target-agent", &format!("127.0.0.1:{target_port}")])
            .args(["--export", "disk"])
            .args(["--nas-nbd", &format!("127.0.0.1:{NBD_PORT}")])
            .args(["--nas-index", &format!("127.0.0.1:{INDEX_PORT}")])
            .args(["--max-bandwidth", &UNCAPPED.to_string()])
            .arg("--json")
            .stderr(Stdio::inherit())
            .output()?;
        let this: Value = serde_json::from_slice(&out.stdout).context("agent migrate report")?;
        anyhow::ensure!(
            this["ok"] == true && pair.verify(),
            "{tag}: migration or guest check failed"
        );
        if !limited {
            report = this.clone();
        }
        eprintln!("bench: {tag}: {this}");
        rows.push(Row {
            name: if limited {
                "agents"
            } else {
                "agents, no link limit (pipeline rate)"
            },
            wire: relay
                .as_ref()
                .map_or(this["link_bytes"].as_u64().unwrap_or(0), |r| {
                    r.bytes.load(Ordering::Relaxed)
                }),
            total_ms: this["total_time_ms"].as_u64().unwrap_or(0),
            downtime_ms: this["downtime_ms"].as_u64().unwrap_or(0),
        });
    }
    // Bytes are judged on the unlimited run, the one that recorded QEMU's stream.
    let stream = dir.join("agents-unlimited-stream.bin");

    println!();
    println!("Migration of a {mem_mb} MiB TCG guest that read {read_mb} MiB of its NAS disk, link limited to 1 Gbit/s:");
    println!();
    println!("| run | bytes on the link | total time | downtime |");
    println!("| --- | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {:.1} MiB | {} ms | {} ms |",
            r.name,
            r.wire as f64 / (1 << 20) as f64,
            r.total_ms,
            r.downtime_ms
        );
    }
    let (plain, multifd, agents) = (&rows[0], &rows[1], &rows[4]);
    println!(
        "| agents vs plain | {:.2}x | {:.2}x | {:.2}x |",
        agents.wire as f64 / plain.wire as f64,
        agents.total_ms as f64 / plain.total_ms as f64,
        agents.downtime_ms as f64 / plain.downtime_ms.max(1) as f64
    );
    println!(
        "| agents vs multifd+zstd | {:.2}x | {:.2}x | {:.2}x |",
        agents.wire as f64 / multifd.wire as f64,
        agents.total_ms as f64 / multifd.total_ms as f64,
        agents.downtime_ms as f64 / multifd.downtime_ms.max(1) as f64
    );

    let (qemu_bytes, on_nas) = pages_on_nas(&std::fs::read(&stream)?, &lab.disk)?;
    let ideal = qemu_bytes - on_nas * PAGE_SIZE as u64 + on_nas * MAPPED_FRAME;
    let link = report["link_bytes"].as_u64().unwrap_or(0);
    println!();
    let points = 100.0 * (link as f64 - ideal as f64) / qemu_bytes as f64;
    println!(
        "Bytes (unlimited run): QEMU {qemu_bytes}, ideal link {ideal} ({:.1}%), agents' link {link} ({:.1}%): \
         {:.2} points {} the ideal ({on_nas} pages on the NAS; DUP frames are not in the ideal).",
        100.0 * ideal as f64 / qemu_bytes as f64,
        100.0 * link as f64 / qemu_bytes as f64,
        points.abs(),
        if points > 0.0 { "above" } else { "below" },
    );
    Ok(())
}

/// Counts the PAGE records of `stream` whose content is a 4 KiB block of `disk`.
fn pages_on_nas(stream: &[u8], disk: &std::path::Path) -> anyhow::Result<(u64, u64)> {
    let disk = std::fs::read(disk)?;
    let blocks: HashSet<[u8; 32]> = disk
        .chunks_exact(PAGE_SIZE)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| *blake3::hash(b).as_bytes())
        .collect();
    struct Count<'a>(&'a HashSet<[u8; 32]>, u64);
    impl Sink for Count<'_> {
        fn verbatim(&mut self, _: &[u8]) {}
        fn page(&mut self, p: &[u8; PAGE_SIZE]) {
            if self.0.contains(blake3::hash(p).as_bytes()) {
                self.1 += 1;
            }
        }
    }
    let mut count = Count(&blocks, 0);
    StreamParser::new().feed(stream, &mut count);
    Ok((stream.len() as u64, count.1))
}
