//! Probes an echo service by hand and prints the report as JSON:
//!
//! ```sh
//! cargo run -p ferry-netprobe --example echo_probe -- 198.18.0.10:7000 \
//!     [--netns /run/netns/NAME] [--secs 5] [--interval-ms 5]
//! ```

use std::time::Duration;

use ferry_netprobe::{error_chain, EchoConfig, EchoProbe};

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: echo_probe ADDR:PORT [--netns PATH] [--secs N] [--interval-ms N]";
    let address = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| die(usage));
    let mut config = EchoConfig::new(address);
    let mut secs = 5.0_f64;
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| die(usage));
        match flag.as_str() {
            "--netns" => config.netns = Some(value.into()),
            "--secs" => secs = value.parse().unwrap_or_else(|_| die(usage)),
            "--interval-ms" => {
                config.interval =
                    Duration::from_millis(value.parse().unwrap_or_else(|_| die(usage)))
            }
            _ => die(usage),
        }
    }
    let probe = EchoProbe::start(config).unwrap_or_else(|e| die(&error_chain(&e)));
    std::thread::sleep(Duration::from_secs_f64(secs));
    let report = probe.stop();
    eprintln!("{report}");
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("serialisable")
    );
    std::process::exit(if report.is_clean() { 0 } else { 1 });
}

fn die(msg: &str) -> ! {
    eprintln!("echo_probe: {msg}");
    std::process::exit(2);
}
