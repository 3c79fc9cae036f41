// Drives Debian's chromium for the Python browser tests (tests/e2e/ohif_support.py) through playwright-core.
//
// One JSON command per line on stdin, one JSON answer per line on stdout: {"id", "ok", "result"|"error"}.
// The page's responses from the origins named in `watch` are recorded with their headers, so the tests can
// say which version the gateway served; nothing is intercepted (an active route makes Playwright answer
// CORS preflights itself, which would hide the gateway's own CORS).
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--disable-quic',
  // OHIF 3.13 shows no image without WebGL; SwiftShader gives it software WebGL.
  '--enable-unsafe-swiftshader',
  '--use-angle=swiftshader',
];

let context = null;
let page = null;
let watch = [];
let responses = [];
let consoleMessages = [];
let pageErrors = [];
let failedRequests = [];
let finished = [];

function watched(url) {
  return watch.some((origin) => url.startsWith(origin));
}

async function launch({ executablePath, userDataDir }) {
  // A persistent context on a fresh directory: the profile is new every run, as the tests require.
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: FLAGS,
    viewport: { width: 1280, height: 800 },
    ignoreDefaultArgs: ['--enable-automation'],
  });
  return { version: context.browser() ? context.browser().version() : 'persistent' };
}

async function newPage({ origins = [], extraHTTPHeaders = null }) {
  if (page) await page.close();
  watch = origins;
  responses = [];
  consoleMessages = [];
  pageErrors = [];
  failedRequests = [];
  finished = [];
  page = await context.newPage();
  if (extraHTTPHeaders) await page.setExtraHTTPHeaders(extraHTTPHeaders);
  page.on('response', async (response) => {
    const url = response.url();
    if (!watched(url)) return;
    const request = response.request();
    let requestHeaders = {};
    try {
      requestHeaders = await request.allHeaders();
    } catch (e) {
      requestHeaders = request.headers();
    }
    let headers = {};
    try {
      headers = await response.allHeaders();
    } catch (e) {
      headers = response.headers();
    }
    responses.push({ url, method: request.method(), status: response.status(), headers, requestHeaders });
  });
  page.on('requestfailed', (request) => {
    if (watched(request.url())) {
      failedRequests.push({ url: request.url(), method: request.method(), failure: request.failure()?.errorText });
    }
  });
  // When each watched request's body was fully read (the bench's "whole series" clock) and its size.
  page.on('requestfinished', async (request) => {
    if (!watched(request.url())) return;
    const t = Date.now();
    let bytes = null;
    try {
      bytes = (await request.sizes()).responseBodySize;
    } catch (e) {
      bytes = null;
    }
    finished.push({ url: request.url(), t, bytes });
  });
  page.on('console', (message) => consoleMessages.push({ type: message.type(), text: message.text() }));
  page.on('pageerror', (error) => pageErrors.push(String(error)));
  return true;
}

function locate(selector) {
  return page.locator(selector).first();
}

const commands = {
  launch,
  newPage,
  async goto({ url, waitUntil = 'domcontentloaded', timeout = 30000 }) {
    const response = await page.goto(url, { waitUntil, timeout });
    return response ? { status: response.status(), headers: await response.allHeaders() } : null;
  },
  // As goto, with the wall clock (ms since the epoch, as the page's Date.now()) read just before it.
  async timedGoto({ url, waitUntil = 'domcontentloaded', timeout = 30000 }) {
    const started = Date.now();
    const response = await page.goto(url, { waitUntil, timeout });
    return { started, status: response ? response.status() : null };
  },
  // A slow line emulated by Chromium itself (DevTools protocol), for this page from now on; mbps null
  // lifts it. Latency in ms is added to every request.
  async emulateNetwork({ mbps = null, latencyMs = 0 }) {
    const cdp = await context.newCDPSession(page);
    await cdp.send('Network.enable');
    const rate = mbps ? (mbps * 1e6) / 8 : -1;
    await cdp.send('Network.emulateNetworkConditions', {
      offline: false,
      latency: mbps ? latencyMs : 0,
      downloadThroughput: rate,
      uploadThroughput: rate,
    });
    return true;
  },
  async waitFor({ selector, state = 'visible', timeout = 30000 }) {
    await locate(selector).waitFor({ state, timeout });
    return true;
  },
  async count({ selector }) {
    return await page.locator(selector).count();
  },
  async texts({ selector }) {
    return await page.locator(selector).allInnerTexts();
  },
  async click({ selector, timeout = 10000, force = false }) {
    await locate(selector).click({ timeout, force });
    return true;
  },
  async clickIfVisible({ selector, timeout = 1000 }) {
    const target = locate(selector);
    try {
      await target.waitFor({ state: 'visible', timeout });
    } catch (e) {
      return false;
    }
    try {
      await target.click({ timeout: 3000 });
    } catch (e) {
      return false; // covered by another overlay: the caller tries again after closing that one
    }
    return true;
  },
  async mouse({ actions }) {
    for (const [kind, ...args] of actions) {
      if (kind === 'move') await page.mouse.move(args[0], args[1], { steps: args[2] || 1 });
      else if (kind === 'down') await page.mouse.down();
      else if (kind === 'up') await page.mouse.up();
      else if (kind === 'click') await page.mouse.click(args[0], args[1]);
      else if (kind === 'wait') await page.waitForTimeout(args[0]);
    }
    return true;
  },
  async press({ key }) {
    await page.keyboard.press(key);
    return true;
  },
  async fill({ selector, value }) {
    await locate(selector).fill(value);
    return true;
  },
  async box({ selector }) {
    return await locate(selector).boundingBox();
  },
  async evaluate({ expression, arg = null }) {
    // expression is the source of a function taking one argument, e.g. "async (arg) => ...".
    const fn = new Function(`return (${expression});`)();
    return await page.evaluate(fn, arg);
  },
  async screenshot({ path, selector = null }) {
    if (selector) {
      await locate(selector).screenshot({ path });
    } else {
      await page.screenshot({ path });
    }
    return path;
  },
  async wait({ ms }) {
    await page.waitForTimeout(ms);
    return true;
  },
  async url() {
    return page.url();
  },
  async responses({ clear = false }) {
    const found = responses;
    if (clear) responses = [];
    return found;
  },
  async finished({ clear = false }) {
    const found = finished;
    if (clear) finished = [];
    return found;
  },
  async diagnostics() {
    return { console: consoleMessages.slice(-200), pageErrors, failedRequests };
  },
  async close() {
    if (context) await context.close();
    context = null;
    page = null;
    return true;
  },
};

const input = createInterface({ input: process.stdin });
for await (const line of input) {
  if (!line.trim()) continue;
  let message;
  try {
    message = JSON.parse(line);
  } catch (e) {
    process.stdout.write(JSON.stringify({ id: null, ok: false, error: `bad JSON: ${e}` }) + '\n');
    continue;
  }
  const { id, cmd, ...args } = message;
  try {
    if (!(cmd in commands)) throw new Error(`unknown command ${cmd}`);
    const result = await commands[cmd](args);
    process.stdout.write(JSON.stringify({ id, ok: true, result }) + '\n');
  } catch (error) {
    process.stdout.write(JSON.stringify({ id, ok: false, error: String(error && error.stack ? error.stack : error) }) + '\n');
  }
  if (cmd === 'close') break;
}
if (context) await context.close().catch(() => {});
process.exit(0);
