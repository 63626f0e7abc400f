//! VM numbers, hostnames and roles: xcluster's scheme, written down once.
//!
//! `vm-001`..`vm-200` are nodes, `vm-201`..`vm-220` routers, `vm-221`..`vm-240`
//! testers; everything above is reserved.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What a VM does in a cluster, decided by its number alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A cluster node (with `--k8s`, vm-001 is also the control plane).
    Node,
    /// Joins the cluster and tester networks and forwards between them.
    Router,
    /// Sits on the tester network only.
    Tester,
    /// Numbers kimg does not hand out.
    Reserved,
}

/// The role table: inclusive number ranges and the role they get.
pub const ROLE_TABLE: &[(u16, u16, Role)] = &[
    (1, 200, Role::Node),
    (201, 220, Role::Router),
    (221, 240, Role::Tester),
];

impl Role {
    /// The first VM number of this role, if the role is handed out.
    pub fn first(self) -> Option<u16> {
        ROLE_TABLE
            .iter()
            .find(|(_, _, r)| *r == self)
            .map(|(lo, _, _)| *lo)
    }

    /// How many VMs of this role a cluster can have.
    pub fn capacity(self) -> u16 {
        ROLE_TABLE
            .iter()
            .find(|(_, _, r)| *r == self)
            .map_or(0, |(lo, hi, _)| hi - lo + 1)
    }

    /// The lower-case name used in status output and service files.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Router => "router",
            Role::Tester => "tester",
            Role::Reserved => "reserved",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A VM's number, 1..=999; its hostname is `vm-NNN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmId(u16);

/// A hostname or number that is not of the form `vm-NNN` with NNN in 1..=999.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadVmName(pub String);

impl fmt::Display for BadVmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a VM name: expected vm-NNN with NNN from 001 to 999 (or just the number)",
            self.0
        )
    }
}

impl std::error::Error for BadVmName {}

impl VmId {
    /// vm-001, the first node.
    pub const FIRST: VmId = VmId(1);

    /// The VM with this number; `None` outside 1..=999.
    pub fn new(n: u16) -> Option<VmId> {
        (1..=999).contains(&n).then_some(VmId(n))
    }

    /// The number.
    pub fn number(self) -> u16 {
        self.0
    }

    /// The role the table gives this number.
    pub fn role(self) -> Role {
        ROLE_TABLE
            .iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&self.0))
            .map_or(Role::Reserved, |(_, _, r)| *r)
    }

    /// `vm-NNN`.
    pub fn hostname(self) -> String {
        format!("vm-{:03}", self.0)
    }
}

impl FromStr for VmId {
    type Err = BadVmName;

    /// Accepts `vm-001`, `vm-1` and plain `1`.
    fn from_str(s: &str) -> Result<VmId, BadVmName> {
        let digits = s.strip_prefix("vm-").unwrap_or(s);
        if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadVmName(s.to_string()));
        }
        digits
            .parse()
            .ok()
            .and_then(VmId::new)
            .ok_or_else(|| BadVmName(s.to_string()))
    }
}

impl TryFrom<String> for VmId {
    type Error = BadVmName;
    fn try_from(s: String) -> Result<VmId, BadVmName> {
        s.parse()
    }
}

impl From<VmId> for String {
    fn from(v: VmId) -> String {
        v.hostname()
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.hostname())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_the_xcluster_table() {
        let role = |s: &str| s.parse::<VmId>().unwrap().role();
        assert_eq!(role("vm-001"), Role::Node);
        assert_eq!(role("vm-200"), Role::Node);
        assert_eq!(role("vm-201"), Role::Router);
        assert_eq!(role("vm-220"), Role::Router);
        assert_eq!(role("vm-221"), Role::Tester);
        assert_eq!(role("vm-240"), Role::Tester);
        assert_eq!(role("vm-241"), Role::Reserved);
        assert_eq!(role("vm-999"), Role::Reserved);
    }

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        assert_eq!("vm-7".parse::<VmId>().unwrap().hostname(), "vm-007");
        assert_eq!("12".parse::<VmId>().unwrap().to_string(), "vm-012");
        for bad in [
            "", "vm-", "vm-0", "vm-1000", "vm-01a", "node-1", "vm--1", "+1",
        ] {
            assert!(bad.parse::<VmId>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn first_and_capacity_come_from_the_table() {
        assert_eq!(Role::Router.first(), Some(201));
        assert_eq!(Role::Tester.capacity(), 20);
        assert_eq!(Role::Reserved.first(), None);
    }
}
