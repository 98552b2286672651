//! A TCP proxy a test can cut, freeze and restore, to take a server away
//! from one process without touching the shared server itself.
//!
//! - `cut`: every connection is closed and new ones are refused, as a
//!   server that is down would.
//! - `freeze`: connections stay open but nothing crosses in either
//!   direction (a black-holed network, a stuck load balancer, a server
//!   under SIGSTOP); new connections are accepted and hang the same way.
//!   `restore` lets the held bytes through, as a healed network would.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Frozen,
    Cut,
}

pub struct Proxy {
    pub addr: SocketAddr,
    state: watch::Sender<State>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free local port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (state, _) = watch::channel(State::Open);
        let states = state.clone();
        let upstream = upstream.to_string();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *states.borrow() == State::Cut {
                    // Refused, as a server that is down would.
                    continue;
                }
                let mut cut = states.subscribe();
                let states = states.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = pump(client_read, server_write, states.subscribe()) => {}
                        _ = pump(server_read, client_write, states.subscribe()) => {}
                        _ = cut.wait_for(|state| *state == State::Cut) => {}
                    }
                });
            }
        });
        Proxy { addr, state, task }
    }

    /// Drops every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.state.send_replace(State::Cut);
    }

    /// Holds every byte in both directions, closing nothing.
    pub fn freeze(&self) {
        self.state.send_replace(State::Frozen);
    }

    /// Forwards again (what a freeze held goes through now).
    pub fn restore(&self) {
        self.state.send_replace(State::Open);
    }
}

/// Copies `from` to `to`, holding each chunk while the proxy is frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<State>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // While frozen nothing is read either, so the sender's own socket
        // buffers fill as they would on a black-holed network.
        if state.wait_for(|s| *s == State::Open).await.is_err() {
            return;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if state.wait_for(|s| *s == State::Open).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.send_replace(State::Cut);
        self.task.abort();
    }
}
