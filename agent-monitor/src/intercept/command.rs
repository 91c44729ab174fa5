//! `agent-monitor ca show|rotate`.

use std::process::ExitCode;

use super::ca::{CaFiles, LocalCa, fingerprint};
use crate::cli::CaCommand;
use crate::control::{self, Request, Response};
use crate::stdout::outln as println;

pub fn main(cmd: CaCommand) -> ExitCode {
    match cmd {
        CaCommand::Show(args) => show(&CaFiles::new(args.ca_dir)),
        CaCommand::Rotate(args) => {
            rotate(&CaFiles::new(args.dir.ca_dir), &args.socket.control_socket)
        }
    }
}

fn show(files: &CaFiles) -> ExitCode {
    // The certificate is public: no root needed, and the key is not read.
    let text = match std::fs::read_to_string(files.cert()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "agent-monitor ca show: {}: {e} (the daemon creates the CA on its first start)",
                files.cert().display()
            );
            return ExitCode::FAILURE;
        }
    };
    let der = match pem::parse(&text) {
        Ok(p) if p.tag() == "CERTIFICATE" => p.into_contents(),
        Ok(p) => {
            eprintln!(
                "agent-monitor ca show: {} holds a {}, not a CERTIFICATE",
                files.cert().display(),
                p.tag()
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("agent-monitor ca show: {}: {e}", files.cert().display());
            return ExitCode::FAILURE;
        }
    };
    println!("certificate: {}", files.cert().display());
    println!("bundle:      {}", files.bundle().display());
    println!("key:         {}", files.key().display());
    println!("sha256:      {}", fingerprint(&der));
    ExitCode::SUCCESS
}

fn rotate(files: &CaFiles, socket: &std::path::Path) -> ExitCode {
    let ca = match LocalCa::create(files) {
        Ok(ca) => ca,
        Err(e) => {
            eprintln!("agent-monitor ca rotate: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = ca.write_bundle(files) {
        eprintln!("agent-monitor ca rotate: the new CA is in place but the bundle is not: {e}");
        return ExitCode::FAILURE;
    }
    println!(
        "new CA: {} (sha256 {})",
        files.cert().display(),
        ca.fingerprint()
    );
    // The daemon re-reads the CA on every reload.
    match control::call(socket, &Request::Reload {}) {
        Ok(Response::Reloaded { .. }) => {
            println!("the daemon reloaded: new intercepted connections get leaves from the new CA");
            ExitCode::SUCCESS
        }
        Ok(Response::Error { message }) => {
            eprintln!(
                "agent-monitor ca rotate: the daemon refused the policy reload ({message}); it \
                 re-read the CA all the same"
            );
            ExitCode::FAILURE
        }
        Ok(other) => {
            eprintln!("agent-monitor ca rotate: unexpected answer to the reload: {other:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!(
                "agent-monitor ca rotate: the daemon was not told ({e}); it reads the new CA at \
                 its next start or `agent-monitor reload`"
            );
            ExitCode::FAILURE
        }
    }
}
