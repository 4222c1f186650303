//! A `redis-server` of a test's own: a free loopback port, its append-only file in a temp folder.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("dynamicrafter-redis-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Self { child: None, port: 0, dir };
        // Another process may take the free port first: then try the next one.
        for _ in 0..5 {
            redis.port = free_port();
            if redis.try_up() {
                return redis;
            }
        }
        panic!("redis-server did not come up");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again, on the same port and data.
    pub fn up(&mut self) {
        assert!(self.try_up(), "redis-server did not come back on port {}", self.port);
    }

    fn try_up(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting redis-server (on Debian: apt-get install redis-server; .ci/run installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.ping().is_none() {
            if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        true
    }

    fn ping(&self) -> Option<()> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.write_all(b"PING\r\n").ok()?;
        let mut reply = [0; 7];
        s.read_exact(&mut reply).ok()?;
        (&reply == b"+PONG\r\n").then_some(())
    }

    /// Stops the server the way an operator would (SIGTERM: it syncs its append-only file).
    pub fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

