//! In-process connections over `tokio::io::duplex` pipes, through the same codec and tasks as
//! TCP. For unit tests and the deterministic simulation.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use tokio::io::DuplexStream;
use tokio::sync::mpsc;

use super::{BoxFuture, Conn, Listener, Transport};

/// Bytes buffered in each direction of an in-memory pipe.
const PIPE_BYTES: usize = 1 << 20;

#[derive(Debug, Default)]
struct Registry {
    next: u64,
    listeners: HashMap<String, (u64, mpsc::Sender<(DuplexStream, String)>)>,
}

/// An in-memory network: listeners are registered by name in this value (clones share it),
/// and `connect` reaches them by that name. Listening on a name ending in `:0` (or on `""`)
/// picks a fresh name.
#[derive(Debug, Clone, Default)]
pub struct MemTransport {
    registry: Arc<Mutex<Registry>>,
}

impl MemTransport {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding this lock leaves the map consistent: keep going.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Listens on `name` (see the type docs).
    pub fn bind(&self, name: &str) -> io::Result<MemListener> {
        let mut reg = self.lock();
        reg.next += 1;
        let id = reg.next;
        let name = if name.is_empty() || name.ends_with(":0") {
            format!("{}mem-{id}", name.strip_suffix('0').unwrap_or(""))
        } else {
            name.to_string()
        };
        if reg.listeners.contains_key(&name) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{name} is already listened on"),
            ));
        }
        let (tx, rx) = mpsc::channel(64);
        reg.listeners.insert(name.clone(), (id, tx));
        Ok(MemListener {
            transport: self.clone(),
            name,
            id,
            rx,
            accepted: 0,
        })
    }

    /// Connects to the listener named `name`.
    pub async fn dial(&self, name: &str) -> io::Result<Conn> {
        let tx = self
            .lock()
            .listeners
            .get(name)
            .map(|(_, tx)| tx.clone())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("nothing listens on {name}"),
                )
            })?;
        let (client, server) = tokio::io::duplex(PIPE_BYTES);
        tx.send((server, format!("client-of-{name}")))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("{name} stopped listening"),
                )
            })?;
        Ok(Conn::from_stream(client, name.to_string()))
    }
}

impl Transport for MemTransport {
    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Conn>> {
        Box::pin(self.dial(addr))
    }

    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Box<dyn Listener>>> {
        Box::pin(async move { Ok(Box::new(self.bind(addr)?) as Box<dyn Listener>) })
    }
}

/// Accepts in-memory connections; stops listening when dropped.
#[derive(Debug)]
pub struct MemListener {
    transport: MemTransport,
    name: String,
    id: u64,
    rx: mpsc::Receiver<(DuplexStream, String)>,
    accepted: u64,
}

impl MemListener {
    pub async fn accept(&mut self) -> io::Result<Conn> {
        let (stream, peer) = self.rx.recv().await.ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotConnected, "listener was unregistered")
        })?;
        self.accepted += 1;
        Ok(Conn::from_stream(
            stream,
            format!("{peer}#{}", self.accepted),
        ))
    }
}

impl Listener for MemListener {
    fn local_addr(&self) -> String {
        self.name.clone()
    }

    fn accept(&mut self) -> BoxFuture<'_, io::Result<Conn>> {
        Box::pin(MemListener::accept(self))
    }
}

impl Drop for MemListener {
    fn drop(&mut self) {
        let mut reg = self.transport.lock();
        if reg.listeners.get(&self.name).map(|(id, _)| *id) == Some(self.id) {
            reg.listeners.remove(&self.name);
        }
    }
}
