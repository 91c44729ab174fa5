//! Taking over the terminal and always giving it back: on return, on error (the guard's drop), on
//! a panic in any thread (a panic hook), and on SIGTERM/SIGINT/SIGHUP (a flag the UI loop polls,
//! so it leaves through the same return path).

use std::io::{Stdout, stdout};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::cursor::{Hide, Show};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};

/// Whether the terminal is ours now (raw mode, alternate screen): restoring twice, or a terminal
/// we never took, would print escape sequences into the operator's shell.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The terminal in raw mode on the alternate screen; dropping it gives the terminal back.
pub struct Screen {
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    pub fn take() -> std::io::Result<Screen> {
        install_panic_hook();
        TAKEN.store(true, Ordering::SeqCst);
        let taken = (|| {
            enable_raw_mode()?;
            execute!(stdout(), EnterAlternateScreen, Hide)?;
            Terminal::new(CrosstermBackend::new(stdout()))
        })();
        match taken {
            Ok(terminal) => Ok(Screen { terminal }),
            Err(e) => {
                give_back();
                Err(e)
            }
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        give_back();
    }
}

/// Leaves raw mode and the alternate screen and shows the cursor, once; true if it did.
fn give_back() -> bool {
    if !TAKEN.swap(false, Ordering::SeqCst) {
        return false;
    }
    // Raw mode first: it has the wider effect on the operator's shell.
    let _ = disable_raw_mode();
    let _ = execute!(stdout(), LeaveAlternateScreen, Show);
    true
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let ours = give_back();
            // The message goes to the restored screen, where the operator can read it.
            previous(info);
            if ours {
                // A reader thread's panic would leave the UI drawing over the shell: end here.
                std::process::exit(101);
            }
        }));
    });
}

/// A flag raised by SIGTERM, SIGINT or SIGHUP (the UI loop then returns and the terminal is given
/// back); a second such signal while the flag is up ends the process at once.
pub fn stop_signals() -> std::io::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT, SIGHUP] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))?;
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    Ok(stop)
}
