//! A loopback TCP relay that limits the forward direction of all its connections together to a
//! fixed rate: the "1 Gbit/s link" of the migration benchmark. It counts the bytes it carries.
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

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

/// A running relay.
pub struct Relay {
    pub port: u16,
    pub bytes: Arc<AtomicU64>,
}

impl Relay {
    /// Relays every connection to `127.0.0.1:upstream`, the forward direction limited to
    /// `rate` bytes per second across connections.
    pub fn start(upstream: u16, rate: u64) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let bytes = Arc::new(AtomicU64::new(0));
        let bucket = Arc::new(Bucket {
            rate: rate as f64,
            state: Mutex::new((0.0, Instant::now())),
        });
        let counted = bytes.clone();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                client.set_nodelay(true).ok();
                server.set_nodelay(true).ok();
                let (bucket, counted) = (bucket.clone(), counted.clone());
                let (mut c_rd, mut s_wr) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = c_rd.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        bucket.take(n);
                        counted.fetch_add(n as u64, Ordering::Relaxed);
                        if s_wr.write_all(&buf[..n]).is_err() {
                            break;
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
        Ok(Self { port, bytes })
    }
}
