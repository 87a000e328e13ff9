//! (work in progress) harness self-check
mod netns_support;

use std::time::Duration;

use netns_support::Net;

#[test]
fn multihost_harness() {
    if let Some(why) = netns_support::unavailable() {
        eprintln!("multihost: skipped: {why}");
        return;
    }
    let stale = netns_support::clean_stale();
    eprintln!("stale removed: {stale:?}");
    let mut net = Net::create(3).expect("topology");
    eprintln!("netem: {:?}", net.netem());
    let got =
        netns_support::udp_probe(&net.hosts[0], &net.hosts[1], &Net::host_ip(1), 2000).unwrap();
    eprintln!("no impairment: {got}/2000");
    let rtt = netns_support::tcp_rtt(&net.client, &net.hosts[0], &Net::host_ip(0)).unwrap();
    eprintln!("rtt {rtt:?}");
    net.impair(2.0, None).unwrap();
    let got =
        netns_support::udp_probe(&net.hosts[0], &net.hosts[1], &Net::host_ip(1), 5000).unwrap();
    eprintln!("2% loss: {got}/5000, dropped {}", net.dropped());
    net.impair(2.0, Some(Duration::from_millis(20))).unwrap();
    let got =
        netns_support::udp_probe(&net.hosts[0], &net.hosts[1], &Net::host_ip(1), 5000).unwrap();
    eprintln!(
        "2% loss + delay: {got}/5000, dropped {} delayed {}",
        net.dropped(),
        net.delayed()
    );
    for _ in 0..5 {
        let rtt = netns_support::tcp_rtt(&net.client, &net.hosts[0], &Net::host_ip(0)).unwrap();
        eprintln!("rtt {rtt:?}");
    }
    net.set_host_link(2, false).unwrap();
    eprintln!(
        "cut: {:?}",
        netns_support::tcp_rtt(&net.client, &net.hosts[2], &Net::host_ip(2))
    );
}
