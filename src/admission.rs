//! Connection admission: the per-node and per-IP connection caps checked before an
//! upgrade, held for the connection's life by an RAII [`Ticket`].
//!
//! Counting happens at admission (not after the upgrade) so a storm of simultaneous
//! upgrades cannot overshoot the cap. The per-IP table exists only when the per-IP cap is
//! on, and drops an address's entry when its last connection ends, so it stays bounded by
//! the number of open connections.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

/// Why a connection was refused before the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `limits.max_conns` reached: HTTP 503.
    #[error("node is at its connection limit")]
    NodeFull,
    /// `limits.max_conns_per_ip` reached: HTTP 429.
    #[error("too many connections from this address")]
    IpFull,
}

pub struct Admission {
    max_conns: usize,
    max_per_ip: usize,
    open: AtomicUsize,
    by_ip: DashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it frees its place.
pub struct Ticket {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

impl Admission {
    pub fn new(max_conns: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max_conns,
            max_per_ip,
            open: AtomicUsize::new(0),
            by_ip: DashMap::new(),
        })
    }

    /// Open connections right now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// # Errors
    /// [`Refused`] when either cap is reached; nothing is counted then.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refused> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_conns {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::NodeFull);
        }
        if self.max_per_ip > 0 {
            let mut n = self.by_ip.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                drop(n);
                self.release_ip(ip);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::IpFull);
            }
            *n += 1;
            return Ok(Ticket {
                admission: Arc::clone(self),
                ip: Some(ip),
            });
        }
        Ok(Ticket {
            admission: Arc::clone(self),
            ip: None,
        })
    }

    /// Drops an address's entry once it counts nothing.
    fn release_ip(&self, ip: IpAddr) {
        self.by_ip.remove_if(&ip, |_, n| *n == 0);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let a = &self.admission;
        if let Some(ip) = self.ip {
            if let Some(mut n) = a.by_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
            }
            a.release_ip(ip);
        }
        a.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_releases() {
        let a = Admission::new(3, 2);
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        let t1 = a.admit(ip1).unwrap();
        let _t2 = a.admit(ip1).unwrap();
        assert_eq!(a.admit(ip1).err(), Some(Refused::IpFull));
        let _t3 = a.admit(ip2).unwrap();
        assert_eq!(a.admit(ip2).err(), Some(Refused::NodeFull));
        drop(t1);
        assert_eq!(a.open(), 2);
        let _t4 = a.admit(ip1).unwrap();
        assert_eq!(a.by_ip.len(), 2);
    }

    #[test]
    fn per_ip_off_keeps_no_table() {
        let a = Admission::new(10, 0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let tickets: Vec<_> = (0..10).map(|_| a.admit(ip).unwrap()).collect();
        assert!(a.by_ip.is_empty());
        drop(tickets);
        assert_eq!(a.open(), 0);
    }
}
