//! A network path that goes silent the way a dead NAT entry or a cut cable leaves it: every packet
//! dropped both ways, no RST, no FIN, no ACK. Unlike [`super::FreezingProxy`] frozen (whose kernel
//! still acknowledges every byte and every keepalive probe), nothing answers, so only the
//! connections' own TCP timers (keepalives, `TCP_USER_TIMEOUT`, retransmissions) can notice.
//!
//! The path is a pass-through proxy on a port of its own; silencing it adds a classic-BPF `tc`
//! filter on the loopback device's ingress that drops the TCP packets to and from that port (and
//! nothing else). Ingress, not egress: a packet dropped on its way out is reported to the
//! sending socket (NET_XMIT_DROP), which then resends keepalive probes as after a local
//! shortage, never counting them unanswered; dropped on the way in, it is lost in the network
//! as far as the sender can tell. Needs root (CAP_NET_ADMIN) and `tc` (iproute2) with
//! `cls_bpf`; the filter is removed when the path is restored or dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use super::FreezingProxy;

/// `ESTABLISHED` in /proc/net/tcp's `st` column.
const ESTABLISHED: &str = "01";

pub struct SilentPath {
    proxy: FreezingProxy,
    pub port: u16,
    /// Whether this path added the `clsact` qdisc to `lo` (and so removes it again).
    added_qdisc: bool,
    silent: bool,
}

impl SilentPath {
    pub async fn start(upstream: &str) -> Self {
        let proxy = FreezingProxy::start(upstream).await;
        let port = proxy.port;
        Self { proxy, port, added_qdisc: false, silent: false }
    }

    /// Drops every packet of the path from now on.
    pub fn silence(&mut self) {
        assert!(!self.silent, "already silent");
        let qdiscs = tc(&["qdisc", "show", "dev", "lo"]);
        if !qdiscs.contains("clsact") {
            tc(&["qdisc", "add", "dev", "lo", "clsact"]);
            self.added_qdisc = true;
        }
        let program = drop_program(self.port);
        let prio = self.port.to_string();
        tc(&[
            "filter", "add", "dev", "lo", "ingress", "prio", &prio, "handle", "1", "bpf", "da", "bytecode",
            &program,
        ]);
        self.silent = true;
    }

    /// Lets packets through again; connections the silence killed stay dead.
    pub fn restore(&mut self) {
        if std::mem::take(&mut self.silent) {
            tc(&["filter", "del", "dev", "lo", "ingress", "prio", &self.port.to_string()]);
        }
        if std::mem::take(&mut self.added_qdisc) {
            tc(&["qdisc", "del", "dev", "lo", "clsact"]);
        }
    }

    /// Connections the proxy accepted so far.
    pub fn connections(&self) -> usize {
        self.proxy.connections()
    }

    /// The TCP connections of process `pid` to this path: local port → whether ESTABLISHED. A
    /// connection the kernel gave up on is gone from the table (or in a closing state) even
    /// while the process still holds its descriptor.
    pub fn connections_of(&self, pid: i32) -> BTreeMap<u16, bool> {
        let inodes = socket_inodes(pid);
        let mut found = BTreeMap::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 10 || !inodes.contains(fields[9]) {
                    continue;
                }
                if port_of(fields[2]) == Some(self.port)
                    && let Some(local) = port_of(fields[1])
                {
                    found.insert(local, fields[3] == ESTABLISHED);
                }
            }
        }
        found
    }
}

impl Drop for SilentPath {
    fn drop(&mut self) {
        // Never leave a filter behind, also when the scenario failed.
        if self.silent {
            let _ = Command::new("tc")
                .args(["filter", "del", "dev", "lo", "ingress", "prio", &self.port.to_string()])
                .status();
        }
        if self.added_qdisc {
            let _ = Command::new("tc").args(["qdisc", "del", "dev", "lo", "clsact"]).status();
        }
    }
}

/// Runs `tc`; fails the scenario with what it said.
fn tc(args: &[&str]) -> String {
    let out = Command::new("tc")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run tc (iproute2), needed to silence a network path: {e}"));
    assert!(
        out.status.success(),
        "tc {}: {} (silencing a path needs root or CAP_NET_ADMIN and cls_bpf)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A classic BPF program for `tc … bpf da bytecode`, over a packet from its Ethernet header:
/// TC_ACT_SHOT (2) for an unfragmented IPv4 TCP segment from or to `port`, TC_ACT_UNSPEC (-1)
/// for everything else. Not TC_ACT_OK: in direct-action mode that ends the classification, so
/// a filter of another path (one a killed run left behind, with a lower `prio`) would let this
/// path's packets through before its own filter saw them. Instructions are `code jt jf k`.
fn drop_program(port: u16) -> String {
    let port = u32::from(port);
    let program: [(u16, u8, u8, u32); 13] = [
        (0x28, 0, 0, 12),       // 0: ldh [12]           ethertype
        (0x15, 0, 10, 0x0800),  // 1: jeq IPv4, else not ours
        (0x30, 0, 0, 23),       // 2: ldb [23]           IP protocol
        (0x15, 0, 8, 6),        // 3: jeq TCP, else not ours
        (0x28, 0, 0, 20),       // 4: ldh [20]           flags and fragment offset
        (0x45, 6, 0, 0x1fff),   // 5: jset fragment, not ours
        (0xb1, 0, 0, 14),       // 6: ldxb 4*([14]&0xf)  IP header length
        (0x48, 0, 0, 14),       // 7: ldh [x+14]         source port
        (0x15, 2, 0, port),     // 8: jeq port, drop
        (0x48, 0, 0, 16),       // 9: ldh [x+16]         destination port
        (0x15, 0, 1, port),     // 10: jeq port, drop, else not ours
        (0x06, 0, 0, 2),        // 11: drop
        (0x06, 0, 0, u32::MAX), // 12: not ours: the next filter decides
    ];
    let instructions: Vec<String> =
        program.iter().map(|(code, jt, jf, k)| format!("{code} {jt} {jf} {k}")).collect();
    format!("{},{}", program.len(), instructions.join(","))
}

/// The port of a /proc/net/tcp address (`0100007F:1F90`).
fn port_of(address: &str) -> Option<u16> {
    u16::from_str_radix(address.rsplit(':').next()?, 16).ok()
}

/// The inodes of the sockets process `pid` has open.
fn socket_inodes(pid: i32) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return BTreeSet::new() };
    entries
        .flatten()
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect()
}
