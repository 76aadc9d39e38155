//! `cargo xtask …`: pinlab's command line. This file only dispatches; each
//! task lives in its own module.

mod apt;
mod bench;
mod console;
mod flags;
mod host;
mod html;
mod image;
mod kernel;
mod kvm;
mod qemu;
mod report;
mod run;
mod series;
mod test;
mod ui;
mod util;
mod vm;

use anyhow::Result;
use std::process::ExitCode;

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            // 69 (EX_UNAVAILABLE): the infrastructure failed, not an expectation.
            ExitCode::from(69)
        }
    }
}

fn real_main() -> Result<bool> {
    let flags = flags::Xtask::from_env_or_exit();
    let cache = util::Cache::from_env()?;
    std::env::set_current_dir(util::project_root())?;
    match flags.subcommand {
        flags::XtaskCmd::Doctor(_) => host::doctor(&cache).map(|()| true),
        flags::XtaskCmd::Kernel(k) => match k.subcommand {
            flags::KernelCmd::Build(k) => {
                host::ensure(&[host::Need::Kernel, host::Need::Image], k.no_install)?;
                let source = match k.kernel_tree {
                    Some(p) => kernel::Source::Tree(p),
                    None => kernel::Source::Debian,
                };
                let built = kernel::build(&cache, k.flavor.unwrap_or(pinlab_scenarios::Flavor::Stock), &source)?;
                println!("{}", built.bzimage.display());
                Ok(true)
            }
            flags::KernelCmd::CheckSeries(c) => {
                host::ensure(&[host::Need::Kernel, host::Need::Image], false)?;
                series::check(&cache, c.full)
            }
            flags::KernelCmd::Edit(_) => series::edit(&cache).map(|()| true),
            flags::KernelCmd::Export(_) => series::export(&cache).map(|()| true),
        },
        flags::XtaskCmd::Image(i) => {
            host::ensure(&[host::Need::Image, host::Need::Demos], i.no_install)?;
            if i.update_lock {
                image::update_lock(&cache)?;
            }
            let root = image::build(&cache)?;
            println!("{}", root.display());
            Ok(true)
        }
        flags::XtaskCmd::Run(r) => {
            let demo = match r.what.as_deref() {
                None => false,
                Some("demo") => true,
                Some(other) => anyhow::bail!("unknown run target '{other}' (did you mean `cargo xtask run demo`?)"),
            };
            run::run(
                &cache,
                run::RunOpts {
                    flavors: r.flavor,
                    fss: r.fs,
                    scenarios: r.scenario,
                    accel: r.accel,
                    kernel_tree: r.kernel_tree,
                    no_install: r.no_install,
                    demo,
                    explain: r.explain,
                },
            )
        }
        flags::XtaskCmd::Shell(sh) => run::shell(
            &cache,
            sh.flavor.unwrap_or(pinlab_scenarios::Flavor::Stock),
            sh.fs.unwrap_or(pinlab_scenarios::Fs::Ext4),
            sh.accel,
        )
        .map(|()| true),
        flags::XtaskCmd::Test(t) => test::run(&cache, t.unit, t.accel),
        flags::XtaskCmd::Bench(b) => {
            bench::bench(&cache, bench::BenchOpts { flavor: b.flavor, fss: b.fs, reps: b.reps, accel: b.accel })
        }
        flags::XtaskCmd::Clean(c) => test::clean(&cache, c.all).map(|()| true),
        flags::XtaskCmd::KvmProbe(_) => kvm::child_main().map(|()| true),
    }
}
