//! A small QMP client: connect to a QEMU monitor socket, negotiate capabilities, run commands.
//!
//! QMP is line-delimited JSON. After the greeting the client sends `qmp_capabilities`; each
//! command then gets one `return` or `error` reply, while asynchronous `event` messages may
//! arrive at any time. Events are kept (bounded) for callers that wait for one. `state`
//! types the run and migration states the replies carry.
mod fdpass;
mod state;

pub use self::state::{MigrationStatus, RunState};
use std::{collections::VecDeque, path::Path, time::Duration};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixStream,
    },
};

/// Events kept for [`Qmp::events`]; older ones are dropped.
const MAX_EVENTS: usize = 256;
/// Longest QMP line accepted.
const MAX_LINE: usize = 16 << 20;
/// How long QEMU may take to greet and to accept `qmp_capabilities`: a monitor socket that
/// accepts and never greets (its QEMU wedged, or exiting) must not hold the agent. A QEMU still
/// starting greets only once its machine is built, which with `-mem-prealloc` includes
/// allocating all guest RAM: seconds, on a loaded host.
const GREETING_LIMIT: Duration = Duration::from_secs(60);
/// How long a command may take when its caller sets no shorter limit. QEMU answers in its main
/// loop, which a migration's completion or a stuck device can hold; past this the command is
/// given up (its late reply, matched by id, is dropped).
pub const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// QMP failures.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP sent invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("QMP closed the connection")]
    Closed,
    #[error("QMP line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP did not answer {0} in time")]
    Timeout(String),
}

/// When the latest `name` event among `events` was emitted: its `timestamp`, QEMU's host's
/// wall clock, as time since the Unix epoch.
pub fn last_event_time(events: &[Value], name: &str) -> Option<Duration> {
    let event = events.iter().rev().find(|e| e["event"] == name)?;
    let t = &event["timestamp"];
    let micros = u32::try_from(t["microseconds"].as_u64()?).ok()?;
    Some(Duration::new(
        t["seconds"].as_u64()?,
        micros.checked_mul(1000)?,
    ))
}

/// How long a migrated guest was paused: from the source QEMU's last STOP event to the target
/// QEMU's last RESUME event. Across two hosts this reads two clocks, so it is as exact as their
/// synchronisation (as libvirt's `downtime_net`). `None` without both events, or if the target
/// resumed "before" the source stopped.
pub fn guest_pause(source_events: &[Value], target_events: &[Value]) -> Option<Duration> {
    let stop = last_event_time(source_events, "STOP")?;
    last_event_time(target_events, "RESUME")?.checked_sub(stop)
}

/// What [`Qmp::on_event`] calls.
pub type EventHook = Box<dyn Fn(&Value) + Send + Sync>;

/// A QMP session.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<Value>,
    /// Called with every event as it is read, also while a command waits for its reply.
    on_event: Option<EventHook>,
    /// A message read in part (see [`Qmp::read_message`]).
    line: Vec<u8>,
    /// The id the next command carries; QEMU echoes it in the reply.
    next_id: u64,
    /// QEMU version from the greeting, e.g. (10, 0, 2).
    pub version: (u64, u64, u64),
    /// The QEMU process at the other end of the socket (SO_PEERCRED), when the kernel says.
    pub peer_pid: Option<u32>,
}

impl Qmp {
    /// Connects to a QMP unix socket and enters command mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok());
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer: w,
            events: VecDeque::new(),
            on_event: None,
            line: Vec::new(),
            next_id: 0,
            version: (0, 0, 0),
            peer_pid,
        };
        let greeted = async {
            let greeting = qmp.read_message().await?;
            let v = &greeting["QMP"]["version"]["qemu"];
            qmp.version = (
                v["major"].as_u64().unwrap_or(0),
                v["minor"].as_u64().unwrap_or(0),
                v["micro"].as_u64().unwrap_or(0),
            );
            qmp.run("qmp_capabilities", None).await.map(drop)
        };
        tokio::time::timeout(GREETING_LIMIT, greeted)
            .await
            .map_err(|_| QmpError::Timeout(format!("the greeting on {}", path.display())))??;
        Ok(qmp)
    }

    /// The next message. Cancel-safe: a line read in part stays in `line` for the next call.
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        loop {
            let room = (MAX_LINE + 1).saturating_sub(self.line.len()) as u64;
            let n = (&mut self.reader)
                .take(room)
                .read_until(b'\n', &mut self.line)
                .await?;
            if self.line.len() > MAX_LINE {
                return Err(QmpError::TooLong);
            }
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if self.line.last() != Some(&b'\n') {
                continue;
            }
            let line = std::mem::take(&mut self.line);
            if !line.trim_ascii().is_empty() {
                return Ok(serde_json::from_slice(&line)?);
            }
        }
    }

    /// Waits for the next event (kept with the others, see [`Qmp::events`]) and returns it.
    /// Cancel-safe, so it can wait beside other work; a command's reply cannot arrive here,
    /// since none is outstanding between [`Qmp::execute`] calls.
    pub async fn next_event(&mut self) -> Result<Value, QmpError> {
        loop {
            let message = self.read_message().await?;
            if message.get("event").is_some() {
                self.keep_event(message.clone());
                return Ok(message);
            }
        }
    }

    /// Calls `hook` with every event from now on, as soon as it is read: also one that arrives
    /// while a command waits for its reply, which [`Qmp::next_event`] never returns. (QEMU
    /// answers no command while its migration thread holds the big lock for the final
    /// iteration, so a command sent just before the guest stops waits out the whole pause.)
    pub fn on_event(&mut self, hook: EventHook) {
        self.on_event = Some(hook);
    }

    fn keep_event(&mut self, event: Value) {
        if let Some(hook) = &self.on_event {
            hook(&event);
        }
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Runs `command` with optional arguments and returns its `return` value; gives up after
    /// [`COMMAND_LIMIT`].
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.execute_timeout(command, args, COMMAND_LIMIT).await
    }

    /// A command line carrying the next id; returns the line and the id.
    fn command_line(
        &mut self,
        command: &str,
        args: Option<Value>,
    ) -> Result<(Vec<u8>, u64), QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg)?;
        line.push(b'\n');
        Ok((line, id))
    }

    /// Sends `command` and waits, without a limit, for its reply.
    async fn run(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let (line, id) = self.command_line(command, args)?;
        self.writer.write_all(&line).await?;
        self.reply(command, id).await
    }

    /// `getfd`: hands QEMU `fd` under `name`, for `fd:NAME` URIs.
    pub async fn pass_fd(
        &mut self,
        name: &str,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), QmpError> {
        let (line, id) = self.command_line("getfd", Some(json!({ "fdname": name })))?;
        let sent = async {
            let sent = fdpass::send_with_fd(self.writer.as_ref(), &line, fd).await?;
            self.writer.write_all(&line[sent..]).await?;
            self.reply("getfd", id).await.map(drop)
        };
        tokio::time::timeout(COMMAND_LIMIT, sent)
            .await
            .map_err(|_| QmpError::Timeout("getfd".into()))?
    }

    /// The reply to command `id`; events before it are kept, and the late replies of commands
    /// given up on are dropped.
    async fn reply(&mut self, command: &str, id: u64) -> Result<Value, QmpError> {
        loop {
            let reply = self.read_message().await?;
            if reply.get("event").is_some() {
                self.keep_event(reply);
                continue;
            }
            if reply.get("id").is_some_and(|got| *got != id) {
                tracing::debug!("dropping the late QMP reply {reply}");
                continue;
            }
            if let Some(err) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("?").to_string(),
                    desc: err["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// [`Qmp::execute`] with a time limit.
    pub async fn execute_timeout(
        &mut self,
        command: &str,
        args: Option<Value>,
        limit: Duration,
    ) -> Result<Value, QmpError> {
        tokio::time::timeout(limit, self.run(command, args))
            .await
            .map_err(|_| QmpError::Timeout(command.to_string()))?
    }

    /// Events received so far (oldest first), drained.
    pub fn events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// `query-status`'s `status` (e.g. running, postmigrate, inmigrate).
    pub async fn status(&mut self) -> Result<RunState, QmpError> {
        let r = self.execute("query-status", None).await?;
        Ok(RunState::parse(r["status"].as_str().unwrap_or("unknown")))
    }

    /// `query-migrate`'s `status`, with the whole reply.
    pub async fn migration(&mut self) -> Result<(MigrationStatus, Value), QmpError> {
        let info = self.execute("query-migrate", None).await?;
        Ok((MigrationStatus::of(&info), info))
    }

    /// Sets one migration parameter (`migrate-set-parameters`) to a number.
    pub async fn set_migration_parameter(
        &mut self,
        name: &str,
        value: u64,
    ) -> Result<(), QmpError> {
        let mut args = serde_json::Map::new();
        args.insert(name.to_string(), value.into());
        self.execute("migrate-set-parameters", Some(Value::Object(args)))
            .await
            .map(drop)
    }

    /// Whether every guest RAM backend is allocated up front (`query-memdev`'s `prealloc`);
    /// `None` when QEMU lists no backends.
    pub async fn ram_preallocated(&mut self) -> Result<Option<bool>, QmpError> {
        let memdevs = self.execute("query-memdev", None).await?;
        let all: Vec<bool> = memdevs
            .as_array()
            .map(|a| a.iter().map(|m| m["prealloc"] == true).collect())
            .unwrap_or_default();
        Ok((!all.is_empty()).then(|| all.iter().all(|&p| p)))
    }

    /// Migration capabilities that are on.
    pub async fn enabled_capabilities(&mut self) -> Result<Vec<String>, QmpError> {
        let caps = self.execute("query-migrate-capabilities", None).await?;
        Ok(caps
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|c| c["state"].as_bool() == Some(true))
                    .filter_map(|c| c["capability"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake monitor's socket in a directory of its own: (directory, socket path, listener).
    fn monitor(tag: &str) -> (std::path::PathBuf, std::path::PathBuf, UnixListener) {
        let dir = std::env::temp_dir().join(format!("qmp-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    /// A scripted fake monitor: enough to test framing, events and errors. The real QEMU is
    /// exercised by the end-to-end tests.
    #[tokio::test]
    async fn handles_greeting_events_and_errors() {
        let (dir, path, listener) = monitor("test");
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}}, \"capabilities\": []}}\n").await.unwrap();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("qmp_capabilities"));
            w.write_all(b"{\"return\": {}}\n").await.unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("query-status"));
            w.write_all(b"{\"event\": \"STOP\", \"data\": {}}\n\n{\"return\": {\"status\": \"running\", \"running\": true}}\n").await.unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n")
                .await
                .unwrap();
        });
        let mut q = Qmp::connect(&path).await.unwrap();
        assert_eq!(q.version, (10, 0, 2));
        // The hook sees the STOP that arrives while query-status waits for its reply.
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let hook_seen = seen.clone();
        q.on_event(Box::new(move |e| {
            hook_seen.lock().unwrap().push(e["event"].clone());
        }));
        assert_eq!(q.status().await.unwrap(), "running");
        assert_eq!(*seen.lock().unwrap(), vec![json!("STOP")]);
        assert_eq!(q.events().len(), 1);
        assert!(q.events().is_empty(), "events are drained");
        match q.execute("migrate", Some(json!({"uri": "x"}))).await {
            Err(QmpError::Command { class, desc, .. }) => {
                assert_eq!((class.as_str(), desc.as_str()), ("GenericError", "nope"))
            }
            other => panic!("{other:?}"),
        }
        server.await.unwrap();
        std::fs::remove_dir_all(dir).ok();
    }

    /// An event waited for beside other work survives being interrupted mid-line: the part
    /// read stays, and the next command's reply is still its own.
    #[tokio::test]
    async fn waiting_for_an_event_is_cancel_safe() {
        let (dir, path, listener) = monitor("event");
        let (half_sent_tx, half_sent_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}}, \"capabilities\": []}}\n").await.unwrap();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            w.write_all(b"{\"return\": {}}\n").await.unwrap();
            // Half an event, then a pause long enough for the waiter to be interrupted.
            w.write_all(b"{\"event\": \"ST").await.unwrap();
            half_sent_tx.send(()).unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("query-status"));
            w.write_all(b"OP\", \"data\": {}}\n{\"return\": {\"status\": \"paused\", \"running\": false}}\n{\"event\": \"RESUME\", \"data\": {}}\n")
                .await
                .unwrap();
        });
        let mut q = Qmp::connect(&path).await.unwrap();
        half_sent_rx.await.unwrap();
        tokio::select! {
            e = q.next_event() => panic!("no whole event was sent yet: {e:?}"),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        assert_eq!(q.status().await.unwrap(), "paused");
        let next = q.next_event().await.unwrap();
        assert_eq!(next["event"], "RESUME");
        let kept: Vec<Value> = q.events();
        assert_eq!(kept.len(), 2);
        assert_eq!(
            (kept[0]["event"].as_str(), kept[1]["event"].as_str()),
            (Some("STOP"), Some("RESUME"))
        );
        server.await.unwrap();
        std::fs::remove_dir_all(dir).ok();
    }

    /// A monitor socket that accepts and never greets (a wedged or exiting QEMU) fails the
    /// connection in bounded time instead of holding the caller.
    #[tokio::test(start_paused = true)]
    async fn a_monitor_that_never_greets_times_out() {
        let (dir, path, listener) = monitor("mute");
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
            drop(s);
        });
        match Qmp::connect(&path).await {
            Err(QmpError::Timeout(what)) => assert!(what.contains("greeting"), "{what}"),
            other => panic!("{:?}", other.map(|q| q.version)),
        }
        server.abort();
        std::fs::remove_dir_all(dir).ok();
    }

    /// A command given up on may still be answered later: that reply carries its own id and is
    /// dropped, so the next command gets its own reply.
    #[tokio::test]
    async fn a_late_reply_is_never_taken_for_the_next_commands() {
        let (dir, path, listener) = monitor("late");
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}}, \"capabilities\": []}}\n").await.unwrap();
            let mut ids = Vec::new();
            for n in 0..3 {
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                let command: Value = serde_json::from_str(&line).unwrap();
                ids.push(command["id"].clone());
                if n == 0 {
                    let ok = json!({ "return": {}, "id": ids[0] });
                    w.write_all(format!("{ok}\n").as_bytes()).await.unwrap();
                }
            }
            // The first query-status's reply comes late, after the second was sent.
            assert_ne!(ids[1], ids[2]);
            let replies = format!(
                "{}\n{}\n",
                json!({ "return": { "status": "paused" }, "id": ids[1] }),
                json!({ "return": { "status": "running" }, "id": ids[2] }),
            );
            w.write_all(replies.as_bytes()).await.unwrap();
        });
        let mut q = Qmp::connect(&path).await.unwrap();
        match q
            .execute_timeout("query-status", None, Duration::from_millis(50))
            .await
        {
            Err(QmpError::Timeout(what)) => assert_eq!(what, "query-status"),
            other => panic!("{other:?}"),
        }
        assert_eq!(q.status().await.unwrap(), "running");
        server.await.unwrap();
        std::fs::remove_dir_all(dir).ok();
    }

    fn event(name: &str, seconds: u64, microseconds: u64) -> Value {
        json!({ "event": name, "data": {}, "timestamp": {
            "seconds": seconds, "microseconds": microseconds } })
    }

    #[test]
    fn guest_pause_runs_from_the_last_stop_to_the_last_resume() {
        let source = [
            event("STOP", 100, 0),
            event("RESUME", 101, 0),
            event("STOP", 200, 250_000),
        ];
        let target = [event("RESUME", 200, 318_500)];
        assert_eq!(
            guest_pause(&source, &target),
            Some(Duration::from_micros(68_500))
        );
        // A missing event, a timestamp QEMU would never send, or clocks that disagree that far.
        assert_eq!(guest_pause(&source[..0], &target), None);
        assert_eq!(guest_pause(&source, &[]), None);
        let bad = [json!({ "event": "RESUME", "timestamp": { "seconds": 201 } })];
        assert_eq!(guest_pause(&source, &bad), None);
        assert_eq!(guest_pause(&source, &[event("RESUME", 199, 0)]), None);
    }
}
