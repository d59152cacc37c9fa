//! A loopback TCP relay that limits the forward direction of all its connections together to a
//! fixed rate: the "1 Gbit/s link" of the migration benchmark. It counts the bytes it carries,
//! and keeps when it carried them, so a benchmark can tell how many crossed after a moment
//! (the guest's STOP).
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

/// Forwarded chunks remembered (up to 64 KiB each): 64 GiB of traffic, far more than a run.
const TIMELINE: usize = 1 << 20;

/// A shared token bucket, in bytes.
struct Bucket {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn take(&self, n: usize) {
        loop {
            let wait = {
                let mut s = self
                    .state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = Instant::now();
                // At most 10 ms of burst.
                s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate)
                    .min(self.rate / 100.0);
                s.1 = now;
                if s.0 >= n as f64 {
                    s.0 -= n as f64;
                    return;
                }
                (n as f64 - s.0) / self.rate
            };
            thread::sleep(Duration::from_secs_f64(wait.max(0.0005)));
        }
    }
}

/// The `via` of [`crate::lab::plain_migration`]: puts a relay at `rate` in front of the port
/// the target QEMU listens on, and keeps it in `slot` for the caller to read once the migration
/// is over.
pub fn via_into(
    slot: &std::cell::RefCell<Option<Relay>>,
    rate: u64,
) -> impl Fn(u16) -> anyhow::Result<u16> + '_ {
    move |port| {
        let relay = Relay::start(port, rate)?;
        let p = relay.port;
        *slot.borrow_mut() = Some(relay);
        Ok(p)
    }
}

/// A running relay.
pub struct Relay {
    pub port: u16,
    pub bytes: Arc<AtomicU64>,
    /// (wall-clock time since the epoch, bytes forwarded by then), one entry per chunk.
    timeline: Arc<Mutex<Vec<(Duration, u64)>>>,
}

impl Relay {
    /// Relays every connection to `127.0.0.1:upstream`, the forward direction limited to
    /// `rate` bytes per second across connections.
    pub fn start(upstream: u16, rate: u64) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let bytes = Arc::new(AtomicU64::new(0));
        let timeline = Arc::new(Mutex::new(Vec::new()));
        let bucket = Arc::new(Bucket {
            rate: rate as f64,
            state: Mutex::new((0.0, Instant::now())),
        });
        let (counted, logged) = (bytes.clone(), timeline.clone());
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                client.set_nodelay(true).ok();
                server.set_nodelay(true).ok();
                let (bucket, counted, logged) = (bucket.clone(), counted.clone(), logged.clone());
                let (mut c_rd, mut s_wr) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = c_rd.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        bucket.take(n);
                        if s_wr.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        // Counted under the lock, so the timeline stays in order across
                        // connections.
                        let mut log = logged
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let total = counted.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                        if log.len() < TIMELINE {
                            log.push((since_epoch(), total));
                        }
                    }
                    s_wr.shutdown(Shutdown::Write).ok();
                });
                let (mut s_rd, mut c_wr) = (server, client);
                thread::spawn(move || {
                    std::io::copy(&mut s_rd, &mut c_wr).ok();
                    c_wr.shutdown(Shutdown::Write).ok();
                });
            }
        });
        Ok(Self {
            port,
            bytes,
            timeline,
        })
    }

    /// Bytes forwarded after `at` (wall-clock time since the epoch, as QMP event timestamps
    /// give it).
    pub fn bytes_after(&self, at: Duration) -> u64 {
        let log = self
            .timeline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = log.partition_point(|&(t, _)| t <= at);
        let by_then = before.checked_sub(1).map_or(0, |i| log[i].1);
        self.bytes.load(Ordering::Relaxed) - by_then
    }
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}
