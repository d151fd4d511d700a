//! TCP: tokio sockets with `TCP_NODELAY`.

use std::io;

use super::{BoxFuture, Conn, Listener, Transport};

/// Datapath connections over TCP.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpTransport;

impl TcpTransport {
    pub fn new() -> Self {
        TcpTransport
    }
}

fn wrap(stream: tokio::net::TcpStream) -> io::Result<Conn> {
    stream.set_nodelay(true)?;
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let (r, w) = stream.into_split();
    Ok(Conn::from_halves(r, w, peer))
}

impl Transport for TcpTransport {
    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Conn>> {
        Box::pin(async move { wrap(tokio::net::TcpStream::connect(addr).await?) })
    }

    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Box<dyn Listener>>> {
        Box::pin(async move {
            let l = TcpListener::bind(addr).await?;
            Ok(Box::new(l) as Box<dyn Listener>)
        })
    }
}

/// A listening TCP socket that accepts datapath connections.
#[derive(Debug)]
pub struct TcpListener {
    inner: tokio::net::TcpListener,
    local: String,
}

impl TcpListener {
    pub async fn bind(addr: &str) -> io::Result<TcpListener> {
        let inner = tokio::net::TcpListener::bind(addr).await?;
        let local = inner.local_addr()?.to_string();
        Ok(TcpListener { inner, local })
    }

    pub async fn accept(&self) -> io::Result<Conn> {
        let (stream, _) = self.inner.accept().await?;
        wrap(stream)
    }
}

impl Listener for TcpListener {
    fn local_addr(&self) -> String {
        self.local.clone()
    }

    fn accept(&mut self) -> BoxFuture<'_, io::Result<Conn>> {
        Box::pin(TcpListener::accept(self))
    }
}
