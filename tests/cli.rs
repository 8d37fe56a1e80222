//! The command line: help, config checking, start-up failures with exit code 2.

mod common;

use common::*;
use std::process::Command;

fn run(args: &[&str], cwd: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(binary()).args(args).current_dir(cwd).env_remove("RUST_LOG").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_explains_every_flag() {
    let dir = scratch_dir();
    let (code, out, _) = run(&["--help"], &dir);
    assert_eq!(code, 0);
    for flag in ["--config", "--shards", "--control-core", "--spin-us", "check-config", "RUST_LOG"] {
        assert!(out.contains(flag), "--help does not mention {flag}:\n{out}");
    }
}

#[test]
fn check_config_prints_the_effective_config_and_warns_on_unsupported_workers() {
    let dir = scratch_dir();
    let path = dir.join("c.yaml");
    std::fs::write(&path, "workers:\n  - name: iii-worker-manager\n    config:\n      port: ${RC_TEST_PORT:4321}\n  - name: iii-http\n").unwrap();
    let (code, out, err) = run(&["check-config", path.to_str().unwrap()], &dir);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("port: 4321"), "{out}");
    assert!(err.contains("iii-http") && err.contains("not supported"), "{err}");
}

#[test]
fn unset_variable_is_a_clear_error_with_exit_code_2() {
    let dir = scratch_dir();
    let path = dir.join("c.yaml");
    std::fs::write(&path, "workers:\n  - name: iii-worker-manager\n    config:\n      port: ${RC_TEST_SURELY_UNSET}\n").unwrap();
    let (code, _, err) = run(&["--config", path.to_str().unwrap()], &dir);
    assert_eq!(code, 2);
    assert!(err.contains("RC_TEST_SURELY_UNSET") && err.contains("line 4"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn unreadable_config_and_unknown_keys_exit_2() {
    let dir = scratch_dir();
    let (code, _, err) = run(&["--config", "/nonexistent/ringcast.yaml"], &dir);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read config file"), "{err}");
    let path = dir.join("c.yaml");
    std::fs::write(&path, "workers:\n  - name: iii-worker-manager\n    config:\n      prot: 1\n").unwrap();
    let (code, _, err) = run(&["check-config", path.to_str().unwrap()], &dir);
    assert_eq!(code, 2);
    assert!(err.contains("prot"), "{err}");
}

#[test]
fn port_in_use_says_so_and_exits_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = scratch_dir();
    let path = dir.join("c.yaml");
    std::fs::write(&path, format!("workers:\n  - name: iii-worker-manager\n    config:\n      host: 127.0.0.1\n      port: {port}\n")).unwrap();
    let (code, _, err) = run(&["--config", path.to_str().unwrap()], &dir);
    assert_eq!(code, 2);
    assert!(err.contains("already in use") && err.contains(&port.to_string()), "{err}");
}

#[test]
fn bad_core_placement_exits_2() {
    let dir = scratch_dir();
    let (code, _, err) = run(&["--control-core", "4096"], &dir);
    assert_eq!(code, 2);
    assert!(err.contains("--control-core"), "{err}");
    let (code, _, err) = run(&["--shards", "0"], &dir);
    assert_eq!(code, 2);
    assert!(err.contains("--shards"), "{err}");
    let (code, _, err) = run(&["--spin-us", "2000000"], &dir);
    assert_eq!(code, 2);
    assert!(err.contains("--spin-us"), "{err}");
}

#[test]
fn config_yaml_in_the_working_directory_is_used_by_default() {
    let dir = scratch_dir();
    let port = free_port();
    std::fs::write(dir.join("config.yaml"), format!("workers:\n  - name: iii-worker-manager\n    config:\n      host: 127.0.0.1\n      port: {port}\n")).unwrap();
    let mut child = Command::new(binary()).current_dir(&dir).stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut worker = loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break Worker::connect_url(&format!("ws://127.0.0.1:{port}/"));
        }
        assert!(std::time::Instant::now() < deadline, "not listening on {port}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    worker.assert_quiet();
    unsafe { libc::kill(child.id() as i32, SIGINT) };
    assert_eq!(wait_exit(&mut child, std::time::Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn the_readme_config_example_is_valid() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("```yaml\n").expect("README has a yaml example") + 8;
    let end = start + readme[start..].find("```").unwrap();
    let dir = scratch_dir();
    let path = dir.join("example.yaml");
    std::fs::write(&path, &readme[start..end]).unwrap();
    let (code, out, err) = run(&["check-config", path.to_str().unwrap()], &dir);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("store_method: file_based"), "{out}");
}
