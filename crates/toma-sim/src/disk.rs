//! A simulated disk that can be unplugged and plugged into another node: one [`MemDevice`]
//! (the platters), seen by each node through a [`SlotDevice`] that answers only while the
//! disk is plugged into that node.

use std::sync::Arc;

use parking_lot::Mutex;
use toma_agent::device::{BlockDevice, DeviceError};
use toma_agent::MemDevice;

#[derive(Debug, Clone)]
pub struct SimDisk {
    pub dev: MemDevice,
    /// The node it is plugged into, or `None` while unplugged.
    pub at: Arc<Mutex<Option<usize>>>,
}

impl SimDisk {
    pub fn new(name: &str, size: u64, node: usize) -> Self {
        SimDisk {
            dev: MemDevice::new(name, size),
            at: Arc::new(Mutex::new(Some(node))),
        }
    }

    pub fn node(&self) -> Option<usize> {
        *self.at.lock()
    }

    /// How node `node` sees this disk.
    pub fn view(&self, node: usize) -> SlotDevice {
        SlotDevice {
            disk: self.clone(),
            node,
            name: format!("{}@node{node}", self.dev.name()),
        }
    }
}

#[derive(Debug)]
pub struct SlotDevice {
    disk: SimDisk,
    node: usize,
    name: String,
}

impl SlotDevice {
    fn present(&self, op: &'static str) -> Result<(), DeviceError> {
        if self.disk.node() == Some(self.node) {
            Ok(())
        } else {
            Err(DeviceError::Vanished {
                device: self.name.clone(),
                op,
            })
        }
    }
}

impl BlockDevice for SlotDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.disk.dev.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.present("read")?;
        self.disk.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.present("write")?;
        self.disk.dev.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.present("flush")?;
        self.disk.dev.flush()
    }
    fn in_memory(&self) -> bool {
        true
    }
}
