//! End-to-end: tools from Debian packages as an overlay. `kimg run ...
//! deb:tcpdump,iperf3` boots two nodes where tcpdump on vm-002 sees a ping from
//! vm-001 and an iperf3 client on vm-001 reports a rate from the server on vm-002;
//! `kimg mkcdrom` makes the same overlay, from kimg's cache the second time.

use kimg_tests::{image, kimg, text, TestCluster};
use std::process::Command;
use std::time::{Duration, Instant};

const TOOLS: &str = "deb:tcpdump,iperf3";

#[test]
fn deb_tcpdump_iperf3_sees_a_ping_and_reports_a_rate() {
    // The overlay first on its own, to report what it costs (cold, then cached).
    let t = tempfile::tempdir().unwrap();
    let rt = t.path().join("rt");
    for round in ["first", "second"] {
        let iso = t.path().join(format!("{round}.iso"));
        let start = Instant::now();
        let o = kimg(&rt, &["mkcdrom", "--out", iso.to_str().unwrap(), TOOLS]);
        assert!(o.status.success(), "kimg mkcdrom {TOOLS}:\n{}", text(&o));
        let size = std::fs::metadata(&iso).unwrap().len();
        eprintln!(
            "kimg mkcdrom {TOOLS} ({round}): {:.2} s, {} KiB",
            start.elapsed().as_secs_f64(),
            size / 1024
        );
    }
    let a = std::fs::read(t.path().join("first.iso")).unwrap();
    assert_eq!(
        a,
        std::fs::read(t.path().join("second.iso")).unwrap(),
        "same bytes"
    );

    let img = image().image.to_str().unwrap();
    let c = TestCluster::new("debs");
    let run = c.kimg(
        "run",
        &[
            "--image",
            img,
            "--nodes",
            "2",
            "--routers",
            "0",
            "--wait=300",
            TOOLS,
        ],
    );
    assert!(run.status.success(), "kimg run:\n{}", text(&run));
    let st = c.status_answered();
    for vm in st["vms"].as_array().unwrap() {
        assert_eq!(vm["state"], "ready", "{vm}");
    }
    c.exec_ok("vm-001", &["tcpdump", "--version"]);

    // tcpdump on vm-002 until it has one ICMP packet; vm-001 pings until it has.
    let mut capture = Command::new(kimg_tests::kimg_bin());
    capture
        .args(["exec", "--name", &c.name, "vm-002", "--"])
        .args([
            "timeout", "120", "tcpdump", "-c", "1", "-n", "-i", "any", "icmp",
        ])
        .env("KIMG_RUNTIME_DIR", c.runtime.path());
    let capture = std::thread::spawn(move || capture.output().unwrap());
    while !capture.is_finished() {
        let _ = c.exec("vm-001", &["ping", "-c", "2", "-W", "1", "192.168.1.2"]);
        std::thread::sleep(Duration::from_millis(500));
    }
    let o = capture.join().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("192.168.1.1 > 192.168.1.2: ICMP echo request"),
        "tcpdump on vm-002:\n{}",
        text(&o)
    );

    // iperf3: a one-shot server on vm-002, a 2 s client on vm-001.
    let mut server = Command::new(kimg_tests::kimg_bin());
    server
        .args(["exec", "--name", &c.name, "vm-002", "--"])
        .args(["timeout", "120", "iperf3", "-s", "-1"])
        .env("KIMG_RUNTIME_DIR", c.runtime.path());
    let server = std::thread::spawn(move || server.output().unwrap());
    let deadline = Instant::now() + Duration::from_secs(100);
    let client = loop {
        let o = c.exec("vm-001", &["iperf3", "-c", "192.168.1.2", "-t", "2"]);
        if o.status.success() || Instant::now() > deadline {
            break o;
        }
        std::thread::sleep(Duration::from_secs(1)); // the server is not listening yet
    };
    let out = String::from_utf8_lossy(&client.stdout);
    assert!(
        client.status.success() && out.contains("bits/sec") && out.contains("receiver"),
        "iperf3 client on vm-001:\n{}",
        text(&client)
    );
    let rate = out
        .lines()
        .find(|l| l.contains("receiver"))
        .unwrap_or_default();
    eprintln!("iperf3 vm-001 -> vm-002: {rate}");
    let s = server.join().unwrap();
    assert!(s.status.success(), "iperf3 server on vm-002:\n{}", text(&s));
}
