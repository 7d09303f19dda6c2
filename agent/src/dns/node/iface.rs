//! The dummy interface holding the listen addresses, over rtnetlink: created `NOARP` and up,
//! each address as /32 or /128 (IPv6 with `nodad`, so it is usable at once instead of after
//! duplicate address detection). The interface is ours: addresses on it that are not listen
//! addresses (a previous config's) are removed. Never touches another interface.

use std::net::IpAddr;
use std::time::Duration;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use rtnetlink::packet_route::link::{LinkFlags, LinkMessage};
use rtnetlink::{Handle, LinkDummy, LinkUnspec};

use super::WiringError;

/// One netlink request: the kernel answers in microseconds; seconds means rtnl_lock is held by
/// something stuck, and the caller should fail and retry at the next check.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);
const ENODEV: i32 = 19;

/// A netlink connection to this network namespace (its task ends when the handle is dropped).
pub struct Netlink {
    handle: Handle,
    name: String,
}

/// What [`Netlink::ensure`] had to fix, as `dns_wiring_repairs_total{what}` labels.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IfaceRepairs {
    pub created: bool,
    pub brought_up: bool,
    pub addresses_added: u32,
    pub addresses_removed: u32,
}

async fn timed<T>(
    name: &str,
    op: &'static str,
    f: impl std::future::Future<Output = Result<T, rtnetlink::Error>>,
) -> Result<T, WiringError> {
    match tokio::time::timeout(NETLINK_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(WiringError::Interface {
            interface: name.to_string(),
            op,
            detail: e.to_string(),
        }),
        Err(_) => Err(WiringError::Interface {
            interface: name.to_string(),
            op,
            detail: format!("no answer within {NETLINK_TIMEOUT:?}"),
        }),
    }
}

fn is_enodev(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.map(|c| c.get()) == Some(-ENODEV))
}

fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    // IPv4: IFA_LOCAL is the interface's own address (IFA_ADDRESS the peer's on p2p links).
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

fn is_link_local_v6(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

impl Netlink {
    pub fn connect(name: &str) -> Result<Self, WiringError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(WiringError::Netlink)?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            name: name.to_string(),
        })
    }

    /// The link, or None when it does not exist.
    async fn link(&self) -> Result<Option<LinkMessage>, WiringError> {
        let req = self
            .handle
            .link()
            .get()
            .match_name(self.name.clone())
            .execute();
        let result = tokio::time::timeout(NETLINK_TIMEOUT, async {
            let mut s = std::pin::pin!(req);
            s.try_next().await
        })
        .await;
        match result {
            Ok(Ok(link)) => Ok(link),
            Ok(Err(e)) if is_enodev(&e) => Ok(None),
            Ok(Err(e)) => Err(WiringError::Interface {
                interface: self.name.clone(),
                op: "get link",
                detail: e.to_string(),
            }),
            Err(_) => Err(WiringError::Interface {
                interface: self.name.clone(),
                op: "get link",
                detail: format!("no answer within {NETLINK_TIMEOUT:?}"),
            }),
        }
    }

    /// True when the interface exists.
    pub async fn exists(&self) -> Result<bool, WiringError> {
        Ok(self.link().await?.is_some())
    }

    async fn addresses(&self, index: u32) -> Result<Vec<AddressMessage>, WiringError> {
        let req = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        timed(&self.name, "list addresses", req.try_collect::<Vec<_>>()).await
    }

    /// Creates the dummy interface if missing, brings it up (NOARP), and makes its addresses
    /// exactly `ips` (IPv6 link-local ones the kernel adds are left alone).
    pub async fn ensure(&self, ips: &[IpAddr]) -> Result<IfaceRepairs, WiringError> {
        let mut repairs = IfaceRepairs::default();
        let link = match self.link().await? {
            Some(l) => l,
            None => {
                let msg = LinkDummy::new(&self.name).arp(false).up().build();
                timed(
                    &self.name,
                    "create dummy link",
                    self.handle.link().add(msg).execute(),
                )
                .await?;
                repairs.created = true;
                self.link().await?.ok_or_else(|| WiringError::Interface {
                    interface: self.name.clone(),
                    op: "get link",
                    detail: "gone right after it was created".into(),
                })?
            }
        };
        let index = link.header.index;
        let flags = link.header.flags;
        if !flags.contains(LinkFlags::Up) || !flags.contains(LinkFlags::Noarp) {
            let msg = LinkUnspec::new_with_index(index).arp(false).up().build();
            timed(
                &self.name,
                "set link up",
                self.handle.link().set(msg).execute(),
            )
            .await?;
            repairs.brought_up = !repairs.created;
        }
        let present = self.addresses(index).await?;
        let have: Vec<IpAddr> = present.iter().filter_map(address_of).collect();
        for m in &present {
            match address_of(m) {
                Some(ip) if ips.contains(&ip) || is_link_local_v6(&ip) => {}
                _ => {
                    timed(
                        &self.name,
                        "delete stale address",
                        self.handle.address().del(m.clone()).execute(),
                    )
                    .await?;
                    repairs.addresses_removed += 1;
                }
            }
        }
        for ip in ips.iter().filter(|ip| !have.contains(ip)) {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            let mut req = self.handle.address().add(index, *ip, len);
            if ip.is_ipv6() {
                let m = req.message_mut();
                m.header.flags |= AddressHeaderFlags::Nodad;
                m.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            timed(&self.name, "add address", req.execute()).await?;
            repairs.addresses_added += 1;
        }
        Ok(repairs)
    }

    /// Removes `ips` from the interface (those present); how many it removed.
    pub async fn remove_addresses(&self, ips: &[IpAddr]) -> Result<u32, WiringError> {
        let Some(link) = self.link().await? else {
            return Ok(0);
        };
        let mut removed = 0;
        for m in self.addresses(link.header.index).await? {
            if address_of(&m).is_some_and(|ip| ips.contains(&ip)) {
                timed(
                    &self.name,
                    "delete address",
                    self.handle.address().del(m).execute(),
                )
                .await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Which of `ips` the interface holds now (none when it does not exist): the read-back of
    /// [`Netlink::remove_addresses`].
    pub async fn holding(&self, ips: &[IpAddr]) -> Result<Vec<IpAddr>, WiringError> {
        let Some(link) = self.link().await? else {
            return Ok(Vec::new());
        };
        Ok(self
            .addresses(link.header.index)
            .await?
            .iter()
            .filter_map(address_of)
            .filter(|ip| ips.contains(ip))
            .collect())
    }

    /// Deletes the interface (and so its addresses); false when it was not there.
    pub async fn delete(&self) -> Result<bool, WiringError> {
        let Some(link) = self.link().await? else {
            return Ok(false);
        };
        match tokio::time::timeout(
            NETLINK_TIMEOUT,
            self.handle.link().del(link.header.index).execute(),
        )
        .await
        {
            Ok(Ok(())) => Ok(true),
            Ok(Err(e)) if is_enodev(&e) => Ok(false),
            Ok(Err(e)) => Err(WiringError::Interface {
                interface: self.name.clone(),
                op: "delete link",
                detail: e.to_string(),
            }),
            Err(_) => Err(WiringError::Interface {
                interface: self.name.clone(),
                op: "delete link",
                detail: format!("no answer within {NETLINK_TIMEOUT:?}"),
            }),
        }
    }
}
