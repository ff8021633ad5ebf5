// What the browser tests share: their environment, their log lines, and Debian's Chromium
// launched the same way for all of them.

import { chromium } from "playwright-core";

/// An environment variable the test needs (the test setup sets it).
export function required(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (run through make test)`);
  return v;
}

export function step(msg) {
  console.log(`    [browser] ${msg}`);
}

/// Headless Chromium (CHROMIUM, default /usr/bin/chromium), offline-friendly: no background
/// traffic to Google's hosts on a closed network.
export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-dev-shm-usage",
    ],
  });
}
