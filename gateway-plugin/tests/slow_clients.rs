//! Slow and hostile clients: slowloris connections (headers a byte at a time, bodies a byte at a
//! time, connections opened and left silent) are closed after the header and body deadlines and
//! do not keep other callers from being served; past the connection limit a connection is
//! answered 503 at once, and served again once a slot is free.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, http};
use test_support::nats_server::NatsServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A slowloris client: sends the start of a request, then one more byte every `every`, never
/// finishing, until the server closes the connection. Returns how long the server took.
async fn trickle(addr: &str, start: &'static [u8], every: Duration) -> Duration {
    let began = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(start).await.unwrap();
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                // Closed (an answer first, for a body that timed out, is fine too).
                Ok(0) | Err(_) => return began.elapsed(),
                Ok(_) => continue,
            },
            () = tokio::time::sleep(every) => {
                if stream.write_all(b"x").await.is_err() {
                    return began.elapsed();
                }
            }
        }
        assert!(
            began.elapsed() < DEADLINE,
            "the server kept a slowloris connection open for {DEADLINE:?}"
        );
    }
}

fn addr(gateway: &Gateway) -> String {
    gateway.url.trim_start_matches("http://").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_connections_are_closed_and_do_not_starve_other_callers() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(
        &nats.url(),
        &["--header-read-timeout", "1s", "--body-read-timeout", "1s"],
    )
    .await;
    let addr = addr(&gateway);
    let every = Duration::from_millis(200);

    // 100 connections sending headers a byte at a time, 50 sending a body a byte at a time,
    // 50 saying nothing at all.
    let mut slow = Vec::new();
    for _ in 0..100 {
        slow.push(tokio::spawn(trickle_owned(
            addr.clone(),
            b"POST /async-function/echo HTTP/1.1\r\nHost: gateway\r\nX-Slow: ",
            every,
        )));
    }
    for _ in 0..50 {
        slow.push(tokio::spawn(trickle_owned(
            addr.clone(),
            b"POST /async-function/echo HTTP/1.1\r\nHost: gateway\r\nContent-Length: 100000\r\n\r\n",
            every,
        )));
    }
    for _ in 0..50 {
        slow.push(tokio::spawn(trickle_owned(addr.clone(), b"", DEADLINE)));
    }

    // Meanwhile every other caller is served.
    let client = http();
    for i in 0..20 {
        let response = client
            .post(format!("{}/async-function/echo", gateway.url))
            .body(format!("call {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "call {i} during the slowloris");
    }

    // And every slow connection is closed, long before the test's deadline.
    for task in slow {
        let held = task.await.unwrap();
        assert!(
            held < Duration::from_secs(20),
            "a slow connection was held for {held:?} with 1s deadlines"
        );
    }
    gateway.shutdown().await;
}

async fn trickle_owned(addr: String, start: &'static [u8], every: Duration) -> Duration {
    trickle(&addr, start, every).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_comes_too_slowly_is_refused_with_400() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &["--body-read-timeout", "1s"]).await;
    let mut stream = TcpStream::connect(addr(&gateway)).await.unwrap();
    stream
        .write_all(
            b"POST /async-function/echo HTTP/1.1\r\nHost: gateway\r\nContent-Length: 10\r\n\r\nabc",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("the server waited for the rest of the body past its deadline")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("unreadable_body"), "{answer}");
    assert_eq!(common::queued(&nats.url()).await, 0, "nothing was queued");
    gateway.shutdown().await;
}

/// One `GET /healthz` on a kept-alive connection; the answer's status line.
async fn healthz_on(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let read_answer = async {
        loop {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_owned)
                    })
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    return head.lines().next().unwrap_or_default().to_owned();
                }
            }
            if n == 0 {
                return format!("closed after {text:?}");
            }
        }
    };
    tokio::time::timeout(DEADLINE, read_answer)
        .await
        .expect("no answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_connection_limit_a_connection_gets_503_at_once() {
    let nats = NatsServer::start().await.unwrap();
    // Long deadlines: the held connections keep their slots for the whole test.
    let gateway = Gateway::start(
        &nats.url(),
        &["--max-connections", "8", "--header-read-timeout", "5m"],
    )
    .await;
    let addr = addr(&gateway);
    // Eight kept-alive connections, each served once, so each holds a slot. (One may be
    // refused while the readiness probe's connection still holds its slot: try it again.)
    let mut held = Vec::new();
    let end = Instant::now() + DEADLINE;
    while held.len() < 8 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let status = healthz_on(&mut stream).await;
        if status.starts_with("HTTP/1.1 200") {
            held.push(stream);
        } else {
            assert!(
                Instant::now() < end,
                "could not open 8 connections: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The ninth is answered 503 and closed at once.
    let mut extra = TcpStream::connect(&addr).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, extra.read_to_end(&mut answer))
        .await
        .expect("a connection past the limit was kept waiting")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    // The held ones are still served.
    assert!(healthz_on(&mut held[0]).await.starts_with("HTTP/1.1 200"));

    // A slot freed is a connection served again.
    held.pop();
    let end = Instant::now() + DEADLINE;
    loop {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        if healthz_on(&mut stream).await.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < end,
            "never served again after a slot was freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    gateway.shutdown().await;
}
