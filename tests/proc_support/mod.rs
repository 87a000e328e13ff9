//! Real `imgate node` processes on loopback, for the process-level and chaos tests.
//!
//! Ports are found by binding port 0 and releasing it just before the node binds it again.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Proc {
    pub id: String,
    pub http: String,
    pub child: Option<Child>,
}

pub struct ProcCluster {
    pub dir: PathBuf,
    pub procs: Vec<Proc>,
}

/// A free TCP port on loopback (bound on port 0, then released).
pub fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free UDP port on loopback (bound on port 0, then released).
pub fn free_udp() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ProcCluster {
    pub fn start(n: usize, extra_toml: &str) -> ProcCluster {
        let (dir, https) = write_config(n, extra_toml);
        let mut c = ProcCluster {
            dir,
            procs: Vec::new(),
        };
        for (i, http) in https.into_iter().enumerate() {
            c.procs.push(Proc {
                id: format!("n{}", i + 1),
                http,
                child: None,
            });
            c.spawn(i);
        }
        c
    }

    pub fn spawn(&mut self, i: usize) {
        let p = &mut self.procs[i];
        let log = std::fs::File::create(self.dir.join(format!("{}.log", p.id))).unwrap();
        let child = Command::new(imgate_binary())
            .arg("node")
            .arg("--config")
            .arg(self.dir.join("cluster.toml"))
            .arg("--id")
            .arg(&p.id)
            .env("IMGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        p.child = Some(child);
    }

    pub fn kill9(&mut self, i: usize) {
        let mut child = self.procs[i].child.take().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    /// Sends `sig` (libc signal number) to node `i`.
    pub fn signal(&self, i: usize, sig: i32) {
        let pid = self.procs[i].child.as_ref().expect("running").id();
        // SAFETY: kill(2) on a child we spawned, with a valid signal number.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL after `limit`); returns the exit status.
    pub async fn terminate(
        &mut self,
        i: usize,
        limit: Duration,
    ) -> Option<std::process::ExitStatus> {
        self.signal(i, libc::SIGTERM);
        let mut child = self.procs[i].child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether node `i` runs.
    pub fn running(&self, i: usize) -> bool {
        self.procs[i].child.is_some()
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.procs[i].id)))
            .unwrap_or_default()
    }

    /// Waits until every running node sees `members` live members, each reachable over its
    /// link (`/health` `ready`); returns the time it took.
    pub async fn wait_ready(&self, members: u64, limit: Duration) -> Duration {
        let running: Vec<usize> = (0..self.procs.len()).filter(|i| self.running(*i)).collect();
        self.wait_ready_on(&running, members, limit).await
    }

    /// [`ProcCluster::wait_ready`] for the nodes `on` only.
    pub async fn wait_ready_on(&self, on: &[usize], members: u64, limit: Duration) -> Duration {
        let bases: Vec<String> = on.iter().map(|i| self.procs[*i].http.clone()).collect();
        imgate::up::wait_ready(&bases, members as usize, limit)
            .await
            .unwrap_or_else(|why| panic!("cluster {why}"))
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `cluster.toml` for nodes `n1..n{n}` on free loopback ports into a new temporary
/// directory; returns the directory and each node's `http://host:port`.
pub fn write_config(n: usize, extra_toml: &str) -> (PathBuf, Vec<String>) {
    let dir = std::env::temp_dir().join(format!(
        "imgate-proc-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ports: Vec<(u16, u16, u16)> = (0..n)
        .map(|_| (free_tcp(), free_udp(), free_udp()))
        .collect();
    let mut toml = format!(
        "[cluster]\nid = \"proc-test\"\nseeds = [\"127.0.0.1:{}\"]\n",
        ports[0].1
    );
    toml.push_str(extra_toml);
    for (i, (h, g, q)) in ports.iter().enumerate() {
        toml.push_str(&format!(
            "[[nodes]]\nid = \"n{}\"\nhttp = \"127.0.0.1:{h}\"\ngossip = \"127.0.0.1:{g}\"\nquic = \"127.0.0.1:{q}\"\n",
            i + 1
        ));
    }
    std::fs::write(dir.join("cluster.toml"), toml).unwrap();
    let https = ports
        .iter()
        .map(|(h, _, _)| format!("http://127.0.0.1:{h}"))
        .collect();
    (dir, https)
}

/// The `imgate` binary: cargo names it for integration tests; an example finds it next to
/// its own directory (`target/<profile>/examples/..` -> `target/<profile>/imgate`).
pub fn imgate_binary() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_imgate") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|examples| examples.parent())
        .map(|dir| dir.join("imgate"))
        .expect("target directory")
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}
