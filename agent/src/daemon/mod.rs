//! The host daemon: one long-running root process per hypervisor host.
//!
//! ```text
//!             +-- IoFollower (eBPF) --events--> event loop --> Registry: per VM, VmTrack + map
//! agent daemon+-- control socket (root-only) <-- agent follow / status / migrate
//!             +-- agent link listener --> serve (the target side, as `agent serve`)
//! ```
//! - [`control`]: the request/reply protocol of the control socket, and its client.
//! - [`maps`]: the followed VMs and the view of a map a migration's source side asks.
//! - [`figures`]: per followed VM, its dirty rate on a schedule, its sampled RAM, its plans.
//! - [`ring`]: per followed VM, the pages KVM's dirty ring saw written (dropped from its map),
//!   and the ring's rates and hot pages.
//! - [`layout`]: per followed VM, its RAM blocks, disks and their fds kept current.
//!
//! Migrations asked over the control socket run here, with the VM's map, so pages it places
//! go out MAPPED with no index round trip. When the daemon is down, `agent migrate` runs the
//! migration itself without a map (the index path), as before. Without eBPF (not root, no
//! object, a refused program) the daemon still serves and migrates, and says why it keeps no
//! maps.
pub mod control;
pub mod figures;
pub mod layout;
pub mod maps;
pub mod ring;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, PoisonError},
    time::Duration,
};

use agent_common::syscalls::{FdKey, IoEvent, SyscallDrop};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
    sync::{mpsc, watch, Semaphore},
};

use self::{
    control::{read_line, MigrateRequest, Request},
    figures::FiguresConfig,
    maps::{export_name, Registry, VmPageMap},
};
use crate::{
    migration::{
        compress::Compression, incoming::Delivery, pagemap::SharedMap, secure::LinkSecurity,
        target::TargetConfig,
    },
    orchestrate::{migrate, MigrateOptions, StreamSpec},
    plan::{plan_now, Ask},
    qmp::Qmp,
    serve::serve,
    telemetry::{track::VmTrack, vm::Vm, IoFollower, ObjectSource},
};

/// Control requests handled at once; more wait for a slot.
const MAX_CONTROL: usize = 16;

/// What the daemon runs with.
pub struct DaemonConfig {
    pub control: PathBuf,
    pub link: TcpListener,
    pub target: TargetConfig,
    pub ebpf: ObjectSource,
    pub figures: FiguresConfig,
    /// Follow KVM VMs' dirty rings (the slot programs cost every ioctl of the host; see
    /// docs/design/plan.md).
    pub dirty_ring: bool,
}

/// Changes to what the follower follows, sent to the event loop that owns it.
enum Follow {
    /// A VM's keys, and whether it runs under KVM (its dirty ring is followed too).
    Add(Vec<FdKey>, bool),
    Remove(Vec<FdKey>),
    /// A followed VM's layout changed: fds to follow and to drop (its dirty ring is untouched).
    Change {
        add: Vec<FdKey>,
        remove: Vec<FdKey>,
    },
}

struct Shared {
    registry: Arc<Registry>,
    figures: FiguresConfig,
    /// Where follow changes go, or why the eBPF side could not be attached.
    follow: Result<mpsc::Sender<Follow>, String>,
    drops: watch::Receiver<[u64; SyscallDrop::COUNT as usize]>,
    /// Whether to follow KVM's dirty rings at all (`--no-dirty-ring`).
    want_ring: bool,
    /// Whether KVM's dirty ring is followed, or why not (the event loop keeps it current).
    dirty_ring: std::sync::Mutex<String>,
    /// The target side's delivery settings: `expect` registers into them.
    delivery: Delivery,
}

/// Runs until `shutdown` turns true.
pub async fn run(config: DaemonConfig, shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    let control = bind_control(&config.control)?;
    tracing::info!("control socket {}", config.control.display());
    let (drops_tx, drops) = watch::channel([0; SyscallDrop::COUNT as usize]);
    let follow = match IoFollower::attach(&config.ebpf) {
        Ok(follower) => {
            let (tx, rx) = mpsc::channel(64);
            Ok((tx, rx, follower))
        }
        Err(e) => {
            tracing::warn!("no memory-to-disk maps: {e}; migrations use the index path");
            Err(e.to_string())
        }
    };
    let shared = Arc::new(Shared {
        registry: Arc::default(),
        figures: config.figures.clone(),
        follow: follow
            .as_ref()
            .map(|(tx, _, _)| tx.clone())
            .map_err(Clone::clone),
        drops,
        want_ring: config.dirty_ring,
        dirty_ring: std::sync::Mutex::new(match &follow {
            Ok(_) if !config.dirty_ring => "off: --no-dirty-ring".to_string(),
            Ok((_, _, f)) => f.dirty_ring_state(),
            Err(e) => format!("off: {e}"),
        }),
        delivery: config.target.delivery.clone(),
    });
    if let Ok((tx, rx, follower)) = follow {
        tokio::spawn(layout::watch(
            shared.registry.clone(),
            tx,
            layout::LOOK_EVERY,
            shutdown.clone(),
        ));
        tokio::spawn(event_loop(
            follower,
            rx,
            shared.clone(),
            drops_tx,
            shutdown.clone(),
        ));
    }
    tokio::spawn(figures::sampler(
        shared.registry.clone(),
        config.figures.clone(),
        shutdown.clone(),
    ));
    let serving = tokio::spawn(serve(config.link, config.target, shutdown.clone()));
    let slots = Arc::new(Semaphore::new(MAX_CONTROL));
    let mut stop = shutdown.clone();
    loop {
        let stream = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            a = control.accept() => match a {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of fds and the like: the daemon serves on once it passes.
                    tracing::warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            handle(stream, &shared).await;
            drop(slot);
        });
    }
    std::fs::remove_file(&config.control).ok();
    serving.await.map_err(std::io::Error::other)?
}

/// The control socket: a socket only root may use, in a private directory when the daemon
/// makes the directory (one that exists already is left as it is: it may be `/run` itself).
fn bind_control(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    if std::fs::symlink_metadata(path)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
    {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Owns the follower: routes events to their VM's map, applies follow changes, publishes the
/// drop counts.
async fn event_loop(
    mut follower: IoFollower,
    mut changes: mpsc::Receiver<Follow>,
    shared: Arc<Shared>,
    drops: watch::Sender<[u64; SyscallDrop::COUNT as usize]>,
    mut stop: watch::Receiver<bool>,
) {
    let mut events = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Reads submitted with io_submit are mapped once due; each event settles those due before
    // it, this the rest (a VM that went quiet after its reads).
    let mut landings = tokio::time::interval(crate::telemetry::aio::LANDING);
    landings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = follower.next_events(&mut events) => {
                if let Err(e) = r {
                    tracing::error!("the follower stopped: {e}");
                    return;
                }
                route(&shared, &mut events);
            }
            change = changes.recv() => {
                let (keys, add, kvm) = match change {
                    Some(Follow::Add(k, kvm)) => (k, true, kvm),
                    Some(Follow::Remove(k)) => (k, false, false),
                    Some(Follow::Change { add, remove }) => {
                        set_followed(&mut follower, &add, true);
                        set_followed(&mut follower, &remove, false);
                        continue;
                    }
                    None => return,
                };
                if kvm && shared.want_ring {
                    let _ = follower.start_dirty_ring();
                    *shared.dirty_ring.lock().unwrap_or_else(PoisonError::into_inner) =
                        follower.dirty_ring_state();
                }
                let keys_tgid = keys.first().map(|k| k.tgid);
                set_followed(&mut follower, &keys, add);
                if let (Some(tgid), Some(dirty)) = (keys_tgid, follower.dirty_ring()) {
                    let r = if add { dirty.follow(tgid) } else { dirty.unfollow(tgid) };
                    if let Err(e) = r {
                        tracing::warn!("cannot change whose dirty pages are followed: {e}");
                    }
                }
            }
            _ = landings.tick() => {
                // This tick cancelled `next_events` (and its drain timer): drain here, so a
                // tick faster than the drain timer never holds events back.
                follower.drain(&mut events);
                route(&shared, &mut events);
                let now = std::time::Instant::now();
                for vm in shared.registry.all() {
                    vm.track().settle(Some(now));
                }
            }
            _ = tick.tick() => {
                // A VM whose QEMU exited is forgotten, so a process that reuses its pid is not
                // followed in its place.
                for vm in shared.registry.all() {
                    let pid = vm.track().vm().pid;
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        tracing::info!("{} (pid {pid}) exited: no longer followed", vm.qmp.display());
                        shared.registry.remove_qmp(&vm.qmp);
                        for key in vm.track().keys() {
                            let _ = follower.unfollow(key);
                        }
                        if let Some(dirty) = follower.dirty_ring() {
                            let _ = dirty.unfollow(pid);
                        }
                    }
                }
                if let Some(dirty) = follower.dirty_ring() {
                    ring::tick(dirty, &shared.registry);
                }
                if let Ok(d) = follower.drops() {
                    for reason in SyscallDrop::ALL {
                        metrics::gauge!("agent_follower_drops", "reason" => reason.name())
                            .set(d[reason as usize] as f64);
                    }
                    drops.send_replace(d);
                }
                for vm in shared.registry.all() {
                    let t = vm.track();
                    let name = vm.qmp.display().to_string();
                    metrics::gauge!("agent_map_entries", "qmp" => name.clone())
                        .set(t.map().len() as f64);
                    metrics::gauge!("agent_follower_events", "qmp" => name.clone())
                        .set(t.events() as f64);
                    let aio = t.aio_stats();
                    for (state, n) in [
                        ("submitted", aio.submitted),
                        ("pending", aio.pending),
                        ("cancelled", aio.cancelled),
                        ("overflowed", aio.overflowed),
                    ] {
                        metrics::gauge!("agent_aio_reads", "qmp" => name.clone(), "state" => state)
                            .set(n as f64);
                    }
                }
            }
        }
    }
}

/// Hands each event to its VM's map.
fn route(shared: &Shared, events: &mut Vec<IoEvent>) {
    for ev in events.drain(..) {
        if let Some(vm) = shared.registry.by_pid(ev.tgid) {
            vm.track().event(&ev);
        }
    }
}

/// Follows (`on`) or stops following `keys`; a key the follower refuses is logged.
fn set_followed(follower: &mut IoFollower, keys: &[FdKey], on: bool) {
    for &key in keys {
        let r = if on {
            follower.follow(key)
        } else {
            follower.unfollow(key)
        };
        if let Err(e) = r {
            tracing::warn!("cannot change what is followed ({key:?}): {e}");
        }
    }
}

async fn handle(stream: UnixStream, shared: &Shared) {
    let root = stream.peer_cred().is_ok_and(|c| c.uid() == 0);
    let (rd, mut wr) = stream.into_split();
    let mut reader = BufReader::new(rd);
    let reply = match read_line(&mut reader).await {
        _ if !root => json!({"ok": false, "error": "the control socket is root's only"}),
        Ok(line) => match serde_json::from_str::<Request>(&line) {
            // The client closing its side cancels a migration, as Ctrl-C does a local one.
            Ok(request) => {
                answer(request, shared, async move {
                    let mut byte = [0u8; 1];
                    let _ = reader.read(&mut byte).await;
                })
                .await
            }
            Err(e) => json!({"ok": false, "error": format!("malformed request: {e}")}),
        },
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    };
    let mut line = reply.to_string().into_bytes();
    line.push(b'\n');
    let _ = wr.write_all(&line).await;
}

async fn answer(
    request: Request,
    shared: &Shared,
    cancel: impl std::future::Future<Output = ()>,
) -> Value {
    let result = match request {
        Request::Follow { qmp } => follow(&qmp, shared).await,
        Request::Unfollow { qmp } => unfollow(&qmp, shared).await,
        Request::Status => Ok(status(shared)),
        Request::Plan { qmp, ask } => plan(qmp, &ask, shared).await,
        Request::Migrate { request } => run_migration(*request, shared, cancel).await,
        Request::Expect {
            vm,
            incoming,
            ttl_secs,
        } => expect(&vm, &incoming, ttl_secs, shared),
    };
    match result {
        Ok(mut v) => {
            v["ok"] = json!(true);
            v
        }
        Err(e) => json!({"ok": false, "error": e}),
    }
}

async fn follow(qmp: &Path, shared: &Shared) -> Result<Value, String> {
    let tx = shared
        .follow
        .as_ref()
        .map_err(|why| format!("telemetry unavailable: {why}"))?;
    // The monitor is held only for the inspection: QEMU serves one client per monitor.
    let mut session = Qmp::connect(qmp).await.map_err(|e| e.to_string())?;
    let vm = Vm::inspect(&mut session).await.map_err(|e| e.to_string())?;
    drop(session);
    let described = describe(&vm);
    let track = VmTrack::new(vm);
    let keys = track.keys();
    let kvm = track.vm().kvm;
    shared.registry.add(qmp.to_path_buf(), track);
    tx.send(Follow::Add(keys, kvm))
        .await
        .map_err(|_| "the follower stopped".to_string())?;
    Ok(json!({ "vm": described }))
}

/// Registers an expected migration for the target side (the libvirt path).
fn expect(vm: &str, incoming: &str, ttl_secs: u64, shared: &Shared) -> Result<Value, String> {
    let ttl = Duration::from_secs(ttl_secs.clamp(1, 24 * 3600));
    shared
        .delivery
        .register(vm, incoming, Some(ttl))
        .map_err(|e| e.to_string())?;
    tracing::info!(
        vm,
        "expecting one incoming migration within {} s",
        ttl.as_secs()
    );
    Ok(json!({}))
}

async fn unfollow(qmp: &Path, shared: &Shared) -> Result<Value, String> {
    let vm = shared
        .registry
        .remove_qmp(qmp)
        .ok_or_else(|| format!("{} is not followed", qmp.display()))?;
    let keys = vm.track().keys();
    if let Ok(tx) = &shared.follow {
        let _ = tx.send(Follow::Remove(keys)).await;
    }
    Ok(json!({}))
}

fn describe(vm: &Vm) -> Value {
    let disks: Vec<Value> = vm
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let fds: Vec<u32> = vm
                .fds
                .iter()
                .filter(|(_, &disk)| disk == i)
                .map(|(fd, _)| *fd)
                .collect();
            match &d.path {
                crate::telemetry::vm::DiskPath::Unfollowable { reason } => {
                    json!({"device": d.device, "followed": false, "reason": reason})
                }
                _ => json!({
                    "device": d.device,
                    "export": export_name(d),
                    "followed": !fds.is_empty(),
                    "fds": fds,
                    "reason": if fds.is_empty() { Some("no fd of QEMU carries it") } else { None },
                }),
            }
        })
        .collect();
    let ram: u64 = vm.blocks.iter().map(|b| b.len).sum();
    // RAM blocks that are files (memfd, hugetlbfs), whose discards are followed on these fds.
    let ram_files: Vec<Value> = vm
        .ram_fds
        .iter()
        .flat_map(|(fd, files)| {
            files
                .iter()
                .map(move |f| json!({"fd": fd, "block": vm.blocks.get(f.block).map(|b| &b.name)}))
        })
        .collect();
    json!({"pid": vm.pid, "ram_bytes": ram, "kvm": vm.kvm, "disks": disks, "ram_files": ram_files})
}

fn status(shared: &Shared) -> Value {
    let vms: Vec<Value> = shared
        .registry
        .all()
        .iter()
        .map(|vm| {
            let t = vm.track();
            let mut d = describe(t.vm());
            let ram = d["ram_bytes"].as_u64().unwrap_or(0).max(1);
            let mirrored = t.map().len() as u64 * 4096;
            d["qmp"] = json!(vm.qmp);
            d["map_entries"] = json!(t.map().len());
            d["mirrored_bytes"] = json!(mirrored);
            d["mirrored_pct"] = json!(100.0 * mirrored as f64 / ram as f64);
            d["map_memory_bytes"] = json!(t.map().memory_bytes());
            d["events"] = json!(t.events());
            d["decode"] = json!(format!("{:?}", t.decode_stats()));
            d["map"] = json!(format!("{:?}", t.map().stats()));
            d["aio"] = json!(t.aio_stats());
            drop(t);
            d["dirty_ring"] = ring::status(vm);
            let f = figures::status(vm, shared.figures.bandwidth);
            if let (Value::Object(d), Value::Object(f)) = (&mut d, f) {
                d.extend(f);
            }
            d
        })
        .collect();
    let drops = *shared.drops.borrow();
    let drops: serde_json::Map<String, Value> = SyscallDrop::ALL
        .iter()
        .map(|r| (r.name().to_string(), json!(drops[*r as usize])))
        .collect();
    let expected: Vec<Value> = shared
        .delivery
        .expected
        .list()
        .into_iter()
        .map(|(vm, incoming, left)| json!({"vm": vm, "incoming": incoming.uri(), "expires_in_s": left}))
        .collect();
    json!({
        "telemetry": shared.follow.as_ref().map(|_| "on".to_string()).unwrap_or_else(|w| format!("off: {w}")),
        "drops": drops,
        "dirty_ring": *shared.dirty_ring.lock().unwrap_or_else(PoisonError::into_inner),
        "vms": vms,
        "expected_migrations": expected,
    })
}

/// Plans for one VM (followed: with its map and smoothed dirty rate; else measured now), or
/// for every followed VM, cheapest to move first.
async fn plan(qmp: Option<PathBuf>, ask: &Ask, shared: &Shared) -> Result<Value, String> {
    let window = shared.figures.window;
    // A smoothed rate is used while younger than two rounds of the schedule.
    let fresh = shared
        .figures
        .interval
        .map_or(Duration::ZERO, |i| 2 * i + window);
    let vms = match &qmp {
        None => shared.registry.all(),
        Some(q) => match shared.registry.by_qmp(q) {
            Some(vm) => vec![vm],
            None => {
                let plan = plan_now(q, window, ask).await.map_err(|e| e.to_string())?;
                return Ok(json!({"plans": [{"qmp": q, "plan": plan, "followed": false}]}));
            }
        },
    };
    Ok(json!({ "plans": figures::rank(vms, ask, window, fresh).await }))
}

async fn run_migration(
    r: MigrateRequest,
    shared: &Shared,
    cancel: impl std::future::Future<Output = ()>,
) -> Result<Value, String> {
    let parse = |s: &str| s.parse::<nas_proto::Endpoint>().map_err(|e| e.to_string());
    let page_map = shared.registry.by_qmp(&r.source_qmp).and_then(|vm| {
        let map = VmPageMap::new(vm, &r.exports);
        map.names_any().then(|| SharedMap(Arc::new(map)))
    });
    if page_map.is_none() {
        tracing::info!(
            "{} is not followed (or names none of its disks): migrating without a map",
            r.source_qmp.display()
        );
    }
    let zstd = Compression::parse(&r.zstd);
    let opts = MigrateOptions {
        source_qmp: r.source_qmp,
        target_qmp: r.target_qmp,
        target_agent: r.target_agent,
        stream: StreamSpec {
            vm: r.vm,
            exports: r.exports,
            nas_nbd: r.nas_nbd,
            nas_index: r.nas_index.as_deref().map(parse).transpose()?,
            nas_tls: nas_client::tls::StorageTls::load(r.nas_tls_creds.as_deref())
                .map_err(|e| e.to_string())?,
            zstd,
            passthrough: r.passthrough,
            dedup_paused: r.dedup_paused,
            record: r.record,
            page_map,
        },
        link_security: LinkSecurity::configure(r.tls_creds.as_deref(), r.insecure, Vec::new())
            .map_err(|e| e.to_string())?,
        source_listen: r.qemu_listen.as_deref().map(parse).transpose()?,
        max_bandwidth: r.max_bandwidth,
        progress: None,
        pause_nice: r.pause_nice,
        timeout: Duration::from_secs(r.timeout_secs),
    };
    let mut report = migrate(opts, cancel).await.map_err(|e| e.to_string())?;
    report.predicted = r.predicted;
    Ok(json!({ "report": report }))
}
