//! A real nginx in front of gateways: `scripts/nginx-throwaway.sh` (Debian's
//! nginx, installed when missing; config, pid and logs in a temp dir),
//! stopped when dropped.

use std::path::PathBuf;
use std::process::Command;

/// A throwaway nginx; `url` is `http://127.0.0.1:PORT`.
pub struct Nginx {
    pub url: String,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx in `mode` (`hash`: consistent hash on the session id in
    /// the path; `rr`: round robin) in front of `upstreams` (`HOST:PORT`).
    pub fn start(mode: &str, upstreams: &[String]) -> Nginx {
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(mode)
            .args(upstreams)
            .output()
            .expect("bash runs scripts/nginx-throwaway.sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "nginx-throwaway.sh start failed ({}): {stderr}",
            out.status
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let mut lines = stdout.lines();
        let dir = PathBuf::from(lines.next().expect("the script prints its directory"));
        let url = lines
            .last()
            .expect("the script prints the URL last")
            .to_string();
        assert!(url.starts_with("http://"), "{stdout}\n{stderr}");
        Nginx { url, dir }
    }

    /// nginx's error log so far (for a failing test's message).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/nginx-throwaway.sh")
}
