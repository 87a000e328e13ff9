//! Network namespaces for the multi-host test (tests/multihost.rs).
//!
//! One namespace holds a bridge; every host namespace (and one client namespace) has a veth
//! to it, with an address on [`SUBNET`].0/24, a range that exists only inside these
//! namespaces. The root namespace's links are never touched. A partition is a bridge-side veth
//! set down; loss is a classic-BPF filter on a `clsact` qdisc (this kernel has no `netem`);
//! delay is a userspace delay line ([`DelayLine`]): each namespace's egress is redirected
//! (`mirred`) to a TAP device whose frames this process holds for the delay and then writes
//! back out of the veth through a marked `AF_PACKET` socket, which the filter lets through.
//!
//! Every name starts with `imgt<pid>-`, and [`Net`]'s `Drop` removes everything it made
//! (deleting a namespace removes its links and filters). [`clean_stale`] removes what a run
//! whose process is gone (a crash, a SIGKILL) left behind.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Every namespace made here is named `imgt<pid>-<role>`.
pub const PREFIX: &str = "imgt";
/// The first three octets of the private /24 used inside the namespaces only.
pub const SUBNET: &str = "10.213.7";
/// The mark of frames the delay line writes back, which the egress filter passes untouched.
const DELAY_MARK: u32 = 0x1d3a_7e11;

/// Runs `prog args`; its stdout, or why it failed.
pub fn sh(prog: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`{prog}` could not be run: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip -n <ns> args`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    sh("ip", &all)
}

/// `tc -n <ns> args`.
pub fn tc_in(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    sh("tc", &all)
}

/// Why namespaces cannot be used here (not root, no `ip netns`, creating one fails), or
/// `None` when they can.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    if let Err(e) = sh("ip", &["netns", "list"]) {
        return Some(format!("`ip netns` is not usable: {e}"));
    }
    if let Err(e) = sh("tc", &["-V"]) {
        return Some(format!("`tc` is not usable: {e}"));
    }
    let probe = format!("{PREFIX}{}-probe", std::process::id());
    if let Err(e) = sh("ip", &["netns", "add", &probe]) {
        return Some(format!("cannot create a network namespace: {e}"));
    }
    let _ = sh("ip", &["netns", "del", &probe]);
    None
}

/// The pid in a name `imgt<pid>-...`, if it is one of ours.
fn pid_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Kills (SIGKILL) every process inside namespace `ns`: only ever called on namespaces this
/// test made, so those are node processes it started.
fn kill_inside(ns: &str) {
    if let Ok(pids) = sh("ip", &["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) with a pid read from the namespace and a valid signal.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Removes namespaces (and temp directories `imgate-multihost-<pid>`) left by earlier runs
/// whose process is gone; returns the names removed.
pub fn clean_stale() -> Vec<String> {
    let mut removed = Vec::new();
    let me = std::process::id();
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(pid) = pid_of(name) else { continue };
            if pid == me || alive(pid) {
                continue;
            }
            kill_inside(name);
            if sh("ip", &["netns", "del", name]).is_ok() {
                removed.push(name.to_string());
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("imgate-multihost-")
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != me && !alive(pid) && std::fs::remove_dir_all(e.path()).is_ok() {
                removed.push(name);
            }
        }
    }
    removed
}

/// Moves the calling thread into namespace `ns` (sockets it makes afterwards live there, and so
/// do threads it spawns).
pub fn enter(ns: &str) -> Result<(), String> {
    let path = format!("/var/run/netns/{ns}");
    let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: setns(2) on an open namespace file descriptor.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!(
            "setns({path}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Runs `f` on a new thread that lives in namespace `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            enter(&ns).unwrap_or_else(|e| panic!("entering {ns}: {e}"));
            f()
        })
        .expect("spawning a thread")
}

/// The namespaces of one run: a bridge, hosts `h1..hN` and a client namespace.
pub struct Net {
    /// `imgt<pid>-`.
    pub prefix: String,
    /// The bridge's namespace.
    pub bridge: String,
    /// Host namespaces, `h1..hN`.
    pub hosts: Vec<String>,
    /// The clients' namespace.
    pub client: String,
    made: Vec<String>,
    delay: Option<DelayLine>,
    loss_applied: bool,
}

impl Net {
    /// Makes the bridge, `hosts` host namespaces and the client namespace, each with `lo` up
    /// and a veth to the bridge. On an error, what was made is removed again.
    pub fn create(hosts: usize) -> Result<Net, String> {
        let prefix = format!("{PREFIX}{}-", std::process::id());
        let mut net = Net {
            bridge: format!("{prefix}br"),
            hosts: (1..=hosts).map(|i| format!("{prefix}h{i}")).collect(),
            client: format!("{prefix}cl"),
            prefix,
            made: Vec::new(),
            delay: None,
            loss_applied: false,
        };
        let br = net.bridge.clone();
        net.add_ns(&br)?;
        ip_in(&br, &["link", "set", "lo", "up"])?;
        ip_in(&br, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&br, &["link", "set", "br0", "up"])?;
        let ends: Vec<(String, String, String)> = net
            .hosts
            .iter()
            .enumerate()
            .map(|(i, ns)| (ns.clone(), format!("vh{}", i + 1), Net::host_ip(i)))
            .chain(std::iter::once((
                net.client.clone(),
                "vcl".to_string(),
                Net::client_ip(),
            )))
            .collect();
        for (ns, port, addr) in ends {
            net.add_ns(&ns)?;
            ip_in(
                &br,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            ip_in(&br, &["link", "set", &port, "master", "br0"])?;
            ip_in(&br, &["link", "set", &port, "up"])?;
            ip_in(&ns, &["link", "set", "lo", "up"])?;
            ip_in(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip_in(&ns, &["link", "set", "eth0", "up"])?;
        }
        Ok(net)
    }

    fn add_ns(&mut self, name: &str) -> Result<(), String> {
        sh("ip", &["netns", "add", name])?;
        self.made.push(name.to_string());
        Ok(())
    }

    /// The address of host `i` (0-based): `10.213.7.<i+1>`.
    pub fn host_ip(i: usize) -> String {
        format!("{SUBNET}.{}", i + 1)
    }

    /// The address of the client namespace.
    pub fn client_ip() -> String {
        format!("{SUBNET}.100")
    }

    /// Host `i`'s (0-based) link to the bridge, up or down (set on the bridge side).
    pub fn set_host_link(&self, i: usize, up: bool) -> Result<(), String> {
        let port = format!("vh{}", i + 1);
        ip_in(
            &self.bridge,
            &["link", "set", &port, if up { "up" } else { "down" }],
        )
        .map(|_| ())
    }

    /// The namespaces with an `eth0`: hosts, then the client.
    pub fn ends(&self) -> Vec<String> {
        self.hosts
            .iter()
            .cloned()
            .chain(std::iter::once(self.client.clone()))
            .collect()
    }

    /// Whether `netem` can be used: tries to add it on the client's veth (and removes it).
    pub fn netem(&self) -> Result<(), String> {
        tc_in(
            &self.client,
            &[
                "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "20ms",
            ],
        )?;
        let _ = tc_in(&self.client, &["qdisc", "del", "dev", "eth0", "root"]);
        Ok(())
    }

    /// Drops `percent` % of the packets leaving every namespace's veth (so every packet
    /// between two namespaces passes exactly one such filter), and, when `delay` is set, holds
    /// every packet for that long on its way out (see [`DelayLine`]). Replaces what was there.
    pub fn impair(&mut self, percent: f64, delay: Option<Duration>) -> Result<(), String> {
        self.clear_impairment();
        if let Some(d) = delay {
            self.delay = Some(DelayLine::start(&self.ends(), d)?);
        }
        let threshold = ((percent / 100.0) * 4_294_967_296.0)
            .round()
            .clamp(0.0, 4_294_967_295.0) as u64;
        for ns in self.ends() {
            tc_in(&ns, &["qdisc", "add", "dev", "eth0", "clsact"])?;
            self.loss_applied = true;
            tc_in(
                &ns,
                &[
                    "filter",
                    "add",
                    "dev",
                    "eth0",
                    "egress",
                    "pref",
                    "1",
                    "bpf",
                    "da",
                    "bytecode",
                    &loss_program(threshold, delay.is_some()),
                ],
            )?;
            if delay.is_some() {
                tc_in(
                    &ns,
                    &[
                        "filter",
                        "add",
                        "dev",
                        "eth0",
                        "egress",
                        "pref",
                        "2",
                        "bpf",
                        "bytecode",
                        "1,6 0 0 4294967295",
                        "action",
                        "mirred",
                        "egress",
                        "redirect",
                        "dev",
                        DELAY_DEV,
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Removes the loss filters and stops the delay line.
    pub fn clear_impairment(&mut self) {
        if self.loss_applied {
            for ns in self.ends() {
                let _ = tc_in(&ns, &["qdisc", "del", "dev", "eth0", "clsact"]);
            }
            self.loss_applied = false;
        }
        if let Some(d) = self.delay.take() {
            d.stop();
        }
    }

    /// Packets the `clsact` qdiscs saw and those their loss filters dropped, summed over the
    /// namespaces (frames written back by the delay line pass a second time and are counted
    /// again in the first figure).
    pub fn loss_counters(&self) -> (u64, u64) {
        let mut seen = 0;
        let mut dropped = 0;
        for ns in self.ends() {
            let Ok(out) = tc_in(&ns, &["-s", "qdisc", "show", "dev", "eth0"]) else {
                continue;
            };
            // "qdisc clsact ffff: parent ffff:fff1 \n Sent 1 bytes 2 pkt (dropped 3, ..."
            for q in out.split("qdisc ").filter(|q| q.starts_with("clsact")) {
                let number_after = |label: &str| -> u64 {
                    q.find(label)
                        .and_then(|at| {
                            q[at + label.len()..]
                                .split([',', ' ', ')'])
                                .next()?
                                .trim()
                                .parse()
                                .ok()
                        })
                        .unwrap_or(0)
                };
                dropped += number_after("(dropped ");
                seen += q
                    .find(" bytes ")
                    .and_then(|at| {
                        q[at + " bytes ".len()..]
                            .split(' ')
                            .next()?
                            .parse::<u64>()
                            .ok()
                    })
                    .unwrap_or(0);
            }
        }
        (seen, dropped)
    }

    /// Packets the loss filters dropped so far.
    pub fn dropped(&self) -> u64 {
        self.loss_counters().1
    }

    /// Frames the delay line held and wrote back so far.
    pub fn delayed(&self) -> u64 {
        self.delay
            .as_ref()
            .map_or(0, |d| d.forwarded.load(Ordering::Relaxed))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(d) = self.delay.take() {
            d.stop();
        }
        for ns in self.made.iter().rev() {
            kill_inside(ns);
            let _ = sh("ip", &["netns", "del", ns]);
        }
    }
}

/// The egress filter (classic BPF, run in direct-action mode): frames written back by the
/// delay line pass (`TC_ACT_OK`); of the rest, those whose random draw is below `threshold`
/// (out of 2^32) are dropped (`TC_ACT_SHOT`), and the others pass (`TC_ACT_OK`), or go on to
/// the next filter (the redirect to the delay line) with `TC_ACT_UNSPEC` when `then_next`.
pub fn loss_program(threshold: u64, then_next: bool) -> String {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    let ad = |off: i32| (libc::SKF_AD_OFF + off) as u32;
    let pass: u32 = if then_next { u32::MAX } else { 0 };
    let prog: [(u16, u8, u8, u32); 7] = [
        (LD_W_ABS, 0, 0, ad(libc::SKF_AD_MARK)),   // 0: A = skb->mark
        (JEQ_K, 0, 1, DELAY_MARK),                 // 1: written back? -> 2, else 3
        (RET_K, 0, 0, 0),                          // 2: TC_ACT_OK
        (LD_W_ABS, 0, 0, ad(libc::SKF_AD_RANDOM)), // 3: A = prandom_u32()
        (JGE_K, 1, 0, threshold as u32),           // 4: A >= threshold? -> 6, else 5
        (RET_K, 0, 0, 2),                          // 5: TC_ACT_SHOT
        (RET_K, 0, 0, pass),                       // 6: TC_ACT_OK or TC_ACT_UNSPEC
    ];
    let mut s = prog.len().to_string();
    for (code, jt, jf, k) in prog {
        s.push_str(&format!(",{code} {jt} {jf} {k}"));
    }
    s
}

/// The TAP device of the delay line in each namespace.
const DELAY_DEV: &str = "dly0";

/// A userspace delay line: in each namespace a TAP device receives (by `mirred` redirect)
/// every frame leaving `eth0`; one thread reads them, holds each for `delay`, and writes it
/// back out of `eth0` through an `AF_PACKET` socket whose frames carry [`DELAY_MARK`], so the
/// egress filter lets them leave. Order is kept (a constant delay, one FIFO).
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    /// Frames written back.
    pub forwarded: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Port {
    tap: OwnedFd,
    out: OwnedFd,
    ifindex: i32,
    mac: [u8; 6],
}

fn parse_mac(ns: &str, dev: &str) -> Result<[u8; 6], String> {
    let out = ip_in(ns, &["-o", "link", "show", "dev", dev])?;
    let at = out
        .find("link/ether ")
        .ok_or_else(|| format!("no MAC address for {dev} in {ns}"))?;
    let text = &out[at + "link/ether ".len()..];
    let mut mac = [0u8; 6];
    for (i, part) in text
        .split_whitespace()
        .next()
        .unwrap_or("")
        .split(':')
        .enumerate()
    {
        if i >= 6 {
            break;
        }
        mac[i] = u8::from_str_radix(part, 16).map_err(|e| format!("MAC of {dev}: {e}"))?;
    }
    Ok(mac)
}

/// Opens, inside `ns`, the TAP device and the marked packet socket of the delay line.
fn open_port(ns: &str) -> Result<Port, String> {
    let ns2 = ns.to_string();
    let (tap, out, ifindex) = spawn_in(ns, move || -> Result<(OwnedFd, OwnedFd, i32), String> {
        let os = |what: &str| format!("{what} in {ns2}: {}", std::io::Error::last_os_error());
        // SAFETY: plain syscalls on descriptors this function owns, with buffers of the sizes
        // the kernel expects (struct ifreq is 40 bytes: name[16], then a short of flags).
        unsafe {
            let fd = libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return Err(os("opening /dev/net/tun"));
            }
            let tap = OwnedFd::from_raw_fd(fd);
            let mut ifr = [0u8; 40];
            ifr[..DELAY_DEV.len()].copy_from_slice(DELAY_DEV.as_bytes());
            let flags: i16 = 0x0002 | 0x1000; // IFF_TAP | IFF_NO_PI
            ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
            const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
            if libc::ioctl(tap.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) < 0 {
                return Err(os("TUNSETIFF"));
            }
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(os("an AF_PACKET socket"));
            }
            let out = OwnedFd::from_raw_fd(fd);
            let mark = DELAY_MARK;
            if libc::setsockopt(
                out.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mark as *const u32).cast(),
                4,
            ) < 0
            {
                return Err(os("SO_MARK"));
            }
            let ifindex = libc::if_nametoindex(c"eth0".as_ptr());
            if ifindex == 0 {
                return Err(os("eth0's index"));
            }
            Ok((tap, out, ifindex as i32))
        }
    })
    .join()
    .map_err(|_| format!("opening the delay line in {ns} panicked"))??;
    // No addresses of its own (so it sends nothing by itself), then up.
    ip_in(ns, &["link", "set", DELAY_DEV, "addrgenmode", "none"])?;
    ip_in(ns, &["link", "set", DELAY_DEV, "up"])?;
    let mac = parse_mac(ns, "eth0")?;
    Ok(Port {
        tap,
        out,
        ifindex,
        mac,
    })
}

impl DelayLine {
    fn start(namespaces: &[String], delay: Duration) -> Result<DelayLine, String> {
        let ports = namespaces
            .iter()
            .map(|ns| open_port(ns))
            .collect::<Result<Vec<Port>, String>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, forwarded) = (stop.clone(), forwarded.clone());
            std::thread::Builder::new()
                .name("delay-line".into())
                .spawn(move || delay_loop(ports, delay, &stop, &forwarded))
                .map_err(|e| format!("spawning the delay line: {e}"))?
        };
        Ok(DelayLine {
            stop,
            forwarded,
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn delay_loop(ports: Vec<Port>, delay: Duration, stop: &AtomicBool, forwarded: &AtomicU64) {
    // Bounded: at most this many frames wait at once (about 8 MB of small frames); more are
    // dropped, as a full queue would.
    const MAX_QUEUED: usize = 65_536;
    let mut queue: VecDeque<(Instant, usize, Vec<u8>)> = VecDeque::new();
    let mut fds: Vec<libc::pollfd> = ports
        .iter()
        .map(|p| libc::pollfd {
            fd: p.tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _, _)| *due <= now) {
            let (_, i, frame) = queue.pop_front().expect("checked");
            if write_out(&ports[i], &frame) {
                forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
        let wait = queue
            .front()
            .map_or(Duration::from_millis(50), |(due, _, _)| {
                due.saturating_duration_since(now)
            })
            .min(Duration::from_millis(50));
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: wait.as_nanos() as libc::c_long,
        };
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        if n <= 0 {
            continue;
        }
        let now = Instant::now();
        for (i, pfd) in fds.iter_mut().enumerate() {
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            pfd.revents = 0;
            // Bounded per round, so that one busy port cannot starve the writes.
            for _ in 0..512 {
                // SAFETY: reading into a buffer of buf.len() bytes.
                let got = unsafe {
                    libc::read(ports[i].tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                };
                if got <= 0 {
                    break;
                }
                let frame = &buf[..got as usize];
                // Only frames that left eth0 (source MAC); nothing the TAP says by itself.
                if frame.len() < 14 || frame[6..12] != ports[i].mac {
                    continue;
                }
                if queue.len() < MAX_QUEUED {
                    queue.push_back((now + delay, i, frame.to_vec()));
                }
            }
        }
    }
}

/// Writes one Ethernet frame out of the port's `eth0`.
fn write_out(port: &Port, frame: &[u8]) -> bool {
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = u16::from_ne_bytes([frame[12], frame[13]]);
    sll.sll_ifindex = port.ifindex;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: sending a buffer of frame.len() bytes to a valid sockaddr_ll.
    let rc = unsafe {
        libc::sendto(
            port.out.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    rc == frame.len() as isize
}

/// Sends `n` UDP datagrams from namespace `from` to `to_ip:port` (a listener in `to`), paced;
/// returns how many arrived. For checking that the loss filter really drops.
pub fn udp_probe(from: &str, to: &str, to_ip: &str, n: usize) -> Result<usize, String> {
    let addr: std::net::SocketAddr = format!("{to_ip}:39999").parse().expect("an address");
    let rx = spawn_in(to, move || -> Result<usize, String> {
        let s = std::net::UdpSocket::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .map_err(|e| e.to_string())?;
        let mut got = 0;
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + Duration::from_secs(20);
        // Ends after 300 ms of silence once the first datagram came, or after 20 s.
        let mut started = false;
        while Instant::now() < deadline {
            match s.recv(&mut buf) {
                Ok(_) => {
                    got += 1;
                    started = true;
                }
                Err(_) if started => break,
                Err(_) => {}
            }
        }
        Ok(got)
    });
    std::thread::sleep(Duration::from_millis(100));
    let tx = spawn_in(from, move || -> Result<(), String> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        for i in 0..n {
            s.send_to(b"imgate-loss-probe", addr)
                .map_err(|e| format!("send to {addr}: {e}"))?;
            if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    });
    tx.join().map_err(|_| "the probe's sender panicked")??;
    rx.join().map_err(|_| "the probe's receiver panicked")?
}

/// The time a TCP connect from namespace `from` to `to_ip` takes (one round trip): a
/// listener in `to` accepts it. For checking the delay line.
pub fn tcp_rtt(from: &str, to: &str, to_ip: &str) -> Result<Duration, String> {
    let addr: std::net::SocketAddr = format!("{to_ip}:39998").parse().expect("an address");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = spawn_in(to, move || -> Result<(), String> {
        let l = std::net::TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
        let _ = ready_tx.send(());
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if l.accept().is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Err("no connection within 10 s".into())
    });
    let _ = ready_rx.recv_timeout(Duration::from_secs(5));
    let rtt = spawn_in(from, move || -> Result<Duration, String> {
        let t = Instant::now();
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        Ok(t.elapsed())
    })
    .join()
    .map_err(|_| "the probe's client panicked")??;
    server.join().map_err(|_| "the probe's server panicked")??;
    Ok(rtt)
}
