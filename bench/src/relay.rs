//! A TCP relay that delays every byte by a fixed time in each direction: the store "milliseconds
//! away" (production's Lakebase) on a loopback-only machine whose kernel has no `netem` qdisc.
//!
//! Written by hand on purpose: no maintained crate relays TCP with an added delay (the proxy
//! crates forward at once, and `tc netem`, the usual tool, is not available here). It is kept
//! small: per connection and per direction, a reader stamps each chunk with the time it was
//! read and queues it (FIFO, so order is kept); a writer sends each chunk at `read time +
//! delay`. The delay is therefore added latency, not a cap on throughput: many chunks can be in
//! flight within one delay, and nothing waits a delay per chunk.
//!
//! It also counts what crosses it, for "store round trips per request" (read by connecting to
//! the stats address, which answers one JSON line):
//! - `turns`: client→server flights, i.e. client data read after the server last spoke (or
//!   first on a connection). For a request–response protocol such as Postgres's, each is one
//!   round trip the client waited for; messages pipelined in one flight count once.
//! - `pg_queries`, `pg_executes`, `pg_syncs`: Postgres frontend messages (simple `Query`,
//!   extended-protocol `Execute` and `Sync`), when the stream parses as the Postgres protocol.
//! - bytes and reads each way, connections accepted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

pub struct Options {
    pub listen: SocketAddr,
    pub to: SocketAddr,
    pub delay: Duration,
    pub stats: SocketAddr,
    pub exit_after: Duration,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    turns: AtomicU64,
    c2s_bytes: AtomicU64,
    c2s_reads: AtomicU64,
    s2c_bytes: AtomicU64,
    s2c_reads: AtomicU64,
    pg_queries: AtomicU64,
    pg_executes: AtomicU64,
    pg_syncs: AtomicU64,
}

impl Counters {
    fn json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "connections": g(&self.connections), "turns": g(&self.turns),
            "c2s_bytes": g(&self.c2s_bytes), "c2s_reads": g(&self.c2s_reads),
            "s2c_bytes": g(&self.s2c_bytes), "s2c_reads": g(&self.s2c_reads),
            "pg_queries": g(&self.pg_queries), "pg_executes": g(&self.pg_executes),
            "pg_syncs": g(&self.pg_syncs),
        })
    }
}

/// Chunks in flight per direction before the reader waits (backpressure, bounded memory).
const QUEUE: usize = 4096;
const READ_SIZE: usize = 64 * 1024;

pub async fn run(o: Options) -> Result<(), String> {
    let listener = TcpListener::bind(o.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", o.listen))?;
    let stats = TcpListener::bind(o.stats)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", o.stats))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("no local address: {e}"))?;
    let stats_addr = stats
        .local_addr()
        .map_err(|e| format!("no local address: {e}"))?;
    // The script reads these two lines from the log.
    println!("listening {addr}");
    println!("stats {stats_addr}");
    let counters = Arc::new(Counters::default());
    {
        let counters = counters.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = stats.accept().await {
                let line = format!("{}\n", counters.json());
                let _ = s.write_all(line.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
    }
    let accept = async {
        loop {
            let (client, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("relay: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            counters.connections.fetch_add(1, Ordering::Relaxed);
            let counters = counters.clone();
            let (to, delay) = (o.to, o.delay);
            tokio::spawn(async move {
                if let Err(e) = connection(client, to, delay, counters).await {
                    eprintln!("relay: {e}");
                }
            });
        }
    };
    tokio::select! {
        () = accept => Ok(()),
        () = tokio::time::sleep(o.exit_after) => Ok(()),
    }
}

async fn connection(
    client: TcpStream,
    to: SocketAddr,
    delay: Duration,
    counters: Arc<Counters>,
) -> Result<(), String> {
    let server = TcpStream::connect(to)
        .await
        .map_err(|e| format!("connect {to}: {e}"))?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // Whether the server spoke last (true at the start: the client's first flight is a turn).
    let server_last = Arc::new(AtomicBool::new(true));
    let c2s = direction(
        cr,
        sw,
        delay,
        Side::Client {
            counters: counters.clone(),
            server_last: server_last.clone(),
            pg: PgCounter::default(),
        },
    );
    let s2c = direction(
        sr,
        cw,
        delay,
        Side::Server {
            counters,
            server_last,
        },
    );
    tokio::join!(c2s, s2c);
    Ok(())
}

enum Side {
    Client {
        counters: Arc<Counters>,
        server_last: Arc<AtomicBool>,
        pg: PgCounter,
    },
    Server {
        counters: Arc<Counters>,
        server_last: Arc<AtomicBool>,
    },
}

impl Side {
    fn saw(&mut self, data: &[u8]) {
        match self {
            Side::Client {
                counters,
                server_last,
                pg,
            } => {
                if server_last.swap(false, Ordering::Relaxed) {
                    counters.turns.fetch_add(1, Ordering::Relaxed);
                }
                counters.c2s_reads.fetch_add(1, Ordering::Relaxed);
                counters
                    .c2s_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                pg.feed(data, counters);
            }
            Side::Server {
                counters,
                server_last,
            } => {
                server_last.store(true, Ordering::Relaxed);
                counters.s2c_reads.fetch_add(1, Ordering::Relaxed);
                counters
                    .s2c_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

/// One direction: read → stamp → queue → wait until due → write. End of stream and errors are
/// passed on in order (after the data before them), then the write side is shut down.
async fn direction(mut r: OwnedReadHalf, mut w: OwnedWriteHalf, delay: Duration, mut side: Side) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Bytes>)>(QUEUE);
    let reader = async move {
        let mut buf = BytesMut::with_capacity(READ_SIZE);
        loop {
            buf.reserve(READ_SIZE);
            // A read error ends this direction like end of stream.
            let n: usize = r.read_buf(&mut buf).await.unwrap_or_default();
            let at = Instant::now();
            if n == 0 {
                let _ = tx.send((at + delay, None)).await;
                return;
            }
            let chunk = buf.split().freeze();
            side.saw(&chunk);
            if tx.send((at + delay, Some(chunk))).await.is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let Some(chunk) = chunk else { break };
            if w.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
        // Dropping the receiver stops the reader at its next chunk.
    };
    tokio::join!(reader, writer);
}

/// Counts Postgres frontend messages in the client's byte stream: the first message (and the
/// one after an SSL or GSS encryption request) has no type byte; every later one is a type byte
/// and a 4-byte big-endian length that includes itself. Gives up (counts nothing more) on a
/// stream that does not parse as that, e.g. one that is not Postgres or is encrypted.
#[derive(Default)]
struct PgCounter {
    /// Bytes of the current message's header seen so far.
    header: Vec<u8>,
    /// Bytes of the current message's body still to skip.
    skip: usize,
    /// Past the untyped start-up message(s).
    typed: bool,
    broken: bool,
}

const SSL_REQUEST: u32 = 80_877_103;
const GSS_REQUEST: u32 = 80_877_104;

impl PgCounter {
    fn feed(&mut self, mut data: &[u8], counters: &Counters) {
        while !self.broken && !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let want = if self.typed { 5 } else { 8 };
            let n = (want - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() < want {
                return;
            }
            let h = std::mem::take(&mut self.header);
            if self.typed {
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
                if len < 4 || !h[0].is_ascii_alphabetic() {
                    self.broken = true;
                    return;
                }
                match h[0] {
                    b'Q' => counters.pg_queries.fetch_add(1, Ordering::Relaxed),
                    b'E' => counters.pg_executes.fetch_add(1, Ordering::Relaxed),
                    b'S' => counters.pg_syncs.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
                self.skip = len - 4;
            } else {
                let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let code = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                if len < 8 {
                    self.broken = true;
                    return;
                }
                // After an encryption request the server answers one byte and the client sends
                // the start-up message (untyped again), or encrypts: nothing to count then.
                if code != SSL_REQUEST && code != GSS_REQUEST {
                    self.typed = true;
                }
                self.skip = len - 8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(t: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![t];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn counts_postgres_messages_split_anywhere() {
        let mut stream = Vec::new();
        // Start-up: length 16, protocol 3.0, 8 bytes of parameters.
        stream.extend_from_slice(&16u32.to_be_bytes());
        stream.extend_from_slice(&196_608u32.to_be_bytes());
        stream.extend_from_slice(b"user\0pg\0");
        stream.extend(msg(b'Q', b"BEGIN\0"));
        stream.extend(msg(b'P', b"\0SELECT 1\0\0\0"));
        stream.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
        stream.extend(msg(b'E', b"\0\0\0\0\0"));
        stream.extend(msg(b'S', b""));
        stream.extend(msg(b'Q', b"COMMIT\0"));
        for split in [1, 3, 7, 1000] {
            let c = Counters::default();
            let mut pg = PgCounter::default();
            for part in stream.chunks(split) {
                pg.feed(part, &c);
            }
            assert_eq!(c.pg_queries.load(Ordering::Relaxed), 2, "split {split}");
            assert_eq!(c.pg_executes.load(Ordering::Relaxed), 1, "split {split}");
            assert_eq!(c.pg_syncs.load(Ordering::Relaxed), 1, "split {split}");
        }
    }

    #[tokio::test]
    async fn delays_each_way_keeps_order_and_counts_turns() {
        // An echo server behind a relay with a 50 ms delay.
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let relay_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let relay_addr = relay_l.local_addr().expect("addr");
        let counters = Arc::new(Counters::default());
        let c2 = counters.clone();
        let delay = Duration::from_millis(50);
        tokio::spawn(async move {
            while let Ok((s, _)) = relay_l.accept().await {
                let c = c2.clone();
                tokio::spawn(connection(s, echo_addr, delay, c));
            }
        });
        let mut s = TcpStream::connect(relay_addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        // One round trip: ≥ 2 × delay, and one turn.
        let t0 = Instant::now();
        s.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.expect("read");
        let rtt = t0.elapsed();
        assert_eq!(&buf, b"ping");
        assert!(rtt >= 2 * delay, "round trip {rtt:?}");
        assert_eq!(counters.turns.load(Ordering::Relaxed), 1);
        // Chunks written 1 ms apart are not serialized by the delay: 30 of them come back in
        // order in about one round trip plus the writing, far less than 30 delays.
        let t0 = Instant::now();
        let mut sent = Vec::new();
        for i in 0..30u8 {
            let chunk = [i; 100];
            s.write_all(&chunk).await.expect("write");
            sent.extend_from_slice(&chunk);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut got = vec![0u8; sent.len()];
        s.read_exact(&mut got).await.expect("read");
        let took = t0.elapsed();
        assert_eq!(got, sent);
        assert!(took < 15 * delay, "30 chunks took {took:?}");
        assert!(counters.turns.load(Ordering::Relaxed) >= 2);
    }
}
