//! `drl load --resp`: the load generator over RESP, `CL.THROTTLE` against
//! the nodes' RESP listeners, paced, timed out and reported as the HTTP
//! mode is (see `load`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::load::{jittered, source_of, LoadArgs, LoadReport, Pacer, SplitMix};
use super::load_report::Progress;
use super::CliError;
use crate::http::client::connect_from;

/// One answer of a RESP node to `CL.THROTTLE`.
#[derive(Debug, PartialEq, Eq)]
enum RespAnswer {
    /// An array whose first integer is 0 (`true`: admitted) or 1.
    Decision(bool),
    /// `-TRYAGAIN ...`: the node was overloaded and counted nothing.
    Shed,
    /// Any other error reply, as sent.
    Error(String),
}

/// Reads one answer of a RESP node into `buf`; `Err` for a broken
/// connection or an answer that is not RESP.
async fn resp_answer(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<RespAnswer> {
    use tokio::io::AsyncReadExt;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    loop {
        // `*5\r\n:<limited>\r\n` and four more integer lines.
        let lines = buf.windows(2).filter(|w| w == b"\r\n").count();
        if buf.first() == Some(&b'-') && lines >= 1 {
            let text = String::from_utf8_lossy(buf).trim_end().to_owned();
            buf.clear();
            return Ok(if text.starts_with("-TRYAGAIN") {
                RespAnswer::Shed
            } else {
                RespAnswer::Error(text)
            });
        }
        if lines >= 6 {
            let limited = buf.get(5) == Some(&b'1');
            buf.clear();
            return Ok(RespAnswer::Decision(!limited));
        }
        if buf.len() > 4096 {
            return Err(bad("answer too long"));
        }
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// [`generate`] over RESP: `CL.THROTTLE` against `args.node` (host:port).
pub(super) async fn resp_load(
    args: &LoadArgs,
    duration: Duration,
    rate: Option<f64>,
    timeout: Duration,
    progress_every: Duration,
) -> Result<LoadReport, CliError> {
    use tokio::io::AsyncWriteExt;
    let cell: Vec<&str> = args.cell.split_whitespace().collect();
    if cell.len() != 3 {
        return Err(CliError::Usage(
            "--cell: max_burst count_per_period period".into(),
        ));
    }
    let mut conns = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let node = &args.node[i % args.node.len()];
        let stream = tokio::time::timeout(timeout, connect_from(node, source_of(args, i)))
            .await
            .map_err(|_| {
                CliError::Usage(format!(
                    "cannot connect to {node}: no answer within {timeout:?}"
                ))
            })?
            .map_err(|e| CliError::Usage(format!("cannot connect to {node}: {e}")))?;
        conns.push(stream);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + duration;
    let turns = Pacer::start(rate, conns.len(), start, deadline)?;
    let progress = Arc::new(Progress::default());
    if !progress_every.is_zero() {
        tokio::spawn(
            progress
                .clone()
                .print_every(progress_every, start, stop.clone()),
        );
    }
    let mut tasks = Vec::with_capacity(conns.len());
    for ((i, mut stream), mut turn) in conns.into_iter().enumerate().zip(turns) {
        let keys = args.keys;
        let stop = stop.clone();
        let progress = progress.clone();
        let node = args.node[i % args.node.len()].clone();
        let source = source_of(args, i);
        let honor_retry_after = args.honor_retry_after;
        let tail: Vec<u8> = cell
            .iter()
            .flat_map(|a| format!("${}\r\n{a}\r\n", a.len()).into_bytes())
            .collect();
        let mut rng = SplitMix(args.seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
        tasks.push(tokio::spawn(async move {
            let mut report = LoadReport::default();
            let mut request = Vec::with_capacity(128);
            let mut answer = Vec::with_capacity(128);
            let mut last_answer = start;
            while !stop.load(Ordering::Relaxed) {
                let Some(scheduled) = turn.next(last_answer).await else {
                    break;
                };
                if scheduled >= deadline {
                    break;
                }
                let key = format!("user-{}", rng.next() % keys);
                request.clear();
                request.extend_from_slice(
                    format!("*5\r\n$11\r\nCL.THROTTLE\r\n${}\r\n{key}\r\n", key.len()).as_bytes(),
                );
                request.extend_from_slice(&tail);
                let exchange = async {
                    stream.write_all(&request).await?;
                    resp_answer(&mut stream, &mut answer).await
                };
                let failure = match tokio::time::timeout(timeout, exchange).await {
                    Ok(Ok(got)) => {
                        last_answer = Instant::now();
                        let took = last_answer.duration_since(scheduled);
                        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
                        match got {
                            RespAnswer::Decision(true) => {
                                report.allowed += 1;
                                report.latency.record(took);
                                progress.allowed.fetch_add(1, Ordering::Relaxed);
                            }
                            RespAnswer::Decision(false) => {
                                report.denied += 1;
                                report.latency.record(took);
                                progress.denied.fetch_add(1, Ordering::Relaxed);
                            }
                            RespAnswer::Shed => {
                                report.shed += 1;
                                report.shed_latency.record(took);
                                progress.shed.fetch_add(1, Ordering::Relaxed);
                                if honor_retry_after {
                                    let wait = jittered(1, &mut rng);
                                    let left = deadline.saturating_duration_since(Instant::now());
                                    tokio::time::sleep(wait.min(left)).await;
                                    last_answer = Instant::now();
                                }
                            }
                            RespAnswer::Error(text) => {
                                report.error(&text);
                                progress.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        None
                    }
                    Ok(Err(e)) => Some(format!("connection: {e}")),
                    Err(_) => Some(format!("timeout: no answer within {timeout:?}")),
                };
                if let Some(reason) = failure {
                    report.error(&reason);
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                    last_answer = Instant::now();
                    answer.clear();
                    // A broken or stuck connection: open a new one, or give up.
                    match tokio::time::timeout(timeout, connect_from(&node, source)).await {
                        Ok(Ok(s)) => stream = s,
                        _ => break,
                    }
                }
            }
            report
        }));
    }
    tokio::time::sleep_until(deadline.into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = LoadReport::default();
    for t in tasks {
        if let Ok(r) = t.await {
            total.merge(&r);
        }
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::load::generate;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        load: LoadArgs,
    }

    #[test]
    fn a_resp_node_that_never_answers_costs_timeouts_with_their_reason_not_a_hang() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // Accepts, reads and never answers.
            let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = silent.local_addr().unwrap();
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((s, _)) = silent.accept().await {
                    held.push(s);
                }
            });
            let args = Wrap::parse_from([
                "x",
                "--resp",
                "--node",
                &addr.to_string(),
                "--connections",
                "2",
                "--duration",
                "600ms",
                "--timeout",
                "100ms",
                "--progress",
                "0s",
            ])
            .load;
            let report = generate(&args).await.unwrap();
            assert_eq!(report.decisions(), 0);
            assert!(report.errors >= 2, "{}", report.errors);
            assert!(
                report.error_reasons[0].0.starts_with("timeout"),
                "{:?}",
                report.error_reasons
            );
            assert!(
                report.elapsed < Duration::from_secs(5),
                "{:?}",
                report.elapsed
            );
        });
    }

    #[test]
    fn tryagain_is_shed_and_other_errors_keep_their_text() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let answers: [&[u8]; 3] = [
                    b"-TRYAGAIN overloaded\r\n",
                    b"-ERR unknown endpoint\r\n",
                    b"*5\r\n:1\r\n:10\r\n:0\r\n:1\r\n:1\r\n",
                ];
                let mut byte = [0u8; 1];
                for a in answers {
                    // One answer per request, as a server does.
                    s.read_exact(&mut byte).await.unwrap();
                    s.write_all(a).await.unwrap();
                }
            });
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut buf = Vec::new();
            let mut next = async || {
                c.write_all(b"?").await.unwrap();
                resp_answer(&mut c, &mut buf).await.unwrap()
            };
            assert_eq!(next().await, RespAnswer::Shed);
            assert_eq!(
                next().await,
                RespAnswer::Error("-ERR unknown endpoint".into())
            );
            assert_eq!(next().await, RespAnswer::Decision(false));
        });
    }
}
