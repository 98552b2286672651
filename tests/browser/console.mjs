// console.mjs: drives the operator web console (`outbox-relay console`) in
// headless Chromium the way an operator would: overview, dead letters
// (filter, detail, requeue two with preview and confirm) and the audit log.
// Prints one line per step; on the first failure it prints why, saves
// failure.png next to the other screenshots and exits 1.
//
//   node console.mjs --url http://127.0.0.1:PORT --token TOKEN \
//     --exchange EXCHANGE --screenshots DIR
//
// Needs at least three dead letters on EXCHANGE (all on the first page of the
// list) and a console that is not read-only. Install with ./install.sh.
import { mkdtemp, mkdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const TIMEOUT = 10_000;
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

class StepFailure extends Error {}

function options() {
  const { values } = parseArgs({
    options: {
      url: { type: 'string' },
      token: { type: 'string' },
      exchange: { type: 'string' },
      screenshots: { type: 'string' },
    },
  });
  for (const name of ['url', 'token', 'exchange', 'screenshots']) {
    if (!values[name]) {
      console.error(`usage: node console.mjs --url URL --token TOKEN --exchange EXCHANGE --screenshots DIR (missing --${name})`);
      process.exit(2);
    }
  }
  return { ...values, url: values.url.replace(/\/+$/, '') };
}

function check(condition, message) {
  if (!condition) throw new StepFailure(message);
}

// Runs fn as one named step: prints "ok - name" or rethrows with the step's name.
async function step(name, fn) {
  try {
    const detail = await fn();
    console.log(`ok - ${name}${detail ? `: ${detail}` : ''}`);
  } catch (err) {
    err.step = name;
    throw err;
  }
}

const testid = (id) => `[data-testid="${id}"]`;

// Waits until predicate(arg) holds in the page; fails with message after TIMEOUT.
async function waitFor(page, message, predicate, arg) {
  try {
    await page.waitForFunction(predicate, arg, { timeout: TIMEOUT });
  } catch {
    throw new StepFailure(`${message} (waited ${TIMEOUT / 1000} s)`);
  }
}

// Waits for `selector` to show, or for the page's error banner; fails with
// the banner's text when that comes first.
async function waitOrError(page, selector, what) {
  const error = page.locator(testid('error'));
  try {
    await page.locator(selector).or(error).filter({ visible: true }).first().waitFor({ timeout: TIMEOUT });
  } catch {
    throw new StepFailure(`${what} never showed (waited ${TIMEOUT / 1000} s)`);
  }
  if (await error.isVisible()) {
    throw new StepFailure(`${what} did not show; the page says: ${await text(error.locator('.banner-text'))}`);
  }
}

async function text(locator) {
  return (await locator.innerText({ timeout: TIMEOUT })).trim();
}

function totalOf(line) {
  const found = /total\s+([\d,]+)/.exec(line);
  check(found, `the dead-letter total line says "${line}", not "total N"`);
  return Number(found[1].replace(/,/g, ''));
}

// ---- the steps

async function overview(page, opts) {
  await page.goto(`${opts.url}/#/overview`, { timeout: TIMEOUT });
  await waitFor(page, 'the overview cards never showed numbers', () => {
    const cards = ['pending', 'in-flight', 'retrying', 'dead', 'published']
      .map((key) => document.querySelector(`[data-testid="overview"] [data-testid="card-${key}"] .value`));
    return cards.every((c) => c && /^\d[\d,]*$/.test(c.textContent.trim()));
  });
  await page.locator(testid('lag-chart')).locator('svg, .empty').first().waitFor({ timeout: TIMEOUT });
  const pending = await text(page.locator(`${testid('card-pending')} .value`));
  const dead = await text(page.locator(`${testid('card-dead')} .value`));
  const database = await text(page.locator(testid('database')));
  const rate = await text(page.locator(`${testid('card-published')} .card-sub`));
  check(/^\d+\.\d\/s last minute, [\d,]+ last hour$/.test(rate), `the published card says "${rate}", not a rate`);
  await page.screenshot({ path: join(opts.screenshots, 'console-overview.png') });
  return `database ${database}, pending ${pending}, dead ${dead}, published ${rate}`;
}

// Waits for the dead-letter list to finish a load newer than `after`.
async function waitDeadLoaded(page, after) {
  await waitFor(page, 'the dead-letter list did not (re)load', (previous) => {
    const section = document.querySelector('[data-testid="dead-page"]');
    const box = section && section.querySelector('[aria-busy]');
    return section && Number(section.dataset.loads || 0) > previous && !box;
  }, after);
}

async function loadsSoFar(page) {
  return Number(await page.locator(testid('dead-page')).getAttribute('data-loads', { timeout: TIMEOUT }) || 0);
}

async function deadRowsShown(page) {
  return {
    total: totalOf(await text(page.locator(testid('dead-total')))),
    ids: await page.locator(`${testid('dead-row')}`).evaluateAll((rows) => rows.map((r) => r.dataset.id)),
  };
}

async function filterDead(page, opts) {
  await page.locator(`.nav a[href="#/dead"]`).click({ timeout: TIMEOUT });
  await page.locator(testid('dead-page')).waitFor({ timeout: TIMEOUT });
  await waitDeadLoaded(page, 0);
  const before = await loadsSoFar(page);
  await page.locator(`${testid('dead-page')} input[name="exchange"]`).fill(opts.exchange, { timeout: TIMEOUT });
  await page.locator(testid('filter')).click({ timeout: TIMEOUT });
  await waitDeadLoaded(page, before);
  const { total, ids } = await deadRowsShown(page);
  check(total === ids.length, `the list says total ${total} but shows ${ids.length} rows`);
  check(total >= 3, `expected at least 3 dead letters on exchange ${opts.exchange}, the list has ${total}`);
  const exchanges = await page.locator(`${testid('dead-row')} td[data-col="exchange"]`).allInnerTexts();
  const wrong = exchanges.filter((x) => x.trim() !== opts.exchange);
  check(wrong.length === 0, `rows of other exchanges are shown: ${[...new Set(wrong)].join(', ')}`);
  await page.screenshot({ path: join(opts.screenshots, 'console-dead-letters.png') });
  return `total ${total}, ${ids.length} rows, all on ${opts.exchange}`;
}

async function openDetail(page) {
  const row = page.locator(testid('dead-row')).first();
  const id = await row.getAttribute('data-id', { timeout: TIMEOUT });
  const messageId = (await text(row.locator('td[data-col="message_id"]')));
  await row.locator(testid('open')).click({ timeout: TIMEOUT });
  const detail = page.locator(testid('dead-detail'));
  await waitOrError(page, `${testid('dead-detail')} [data-field="message_id"]`, 'the dead letter\'s detail');
  const shown = await text(detail.locator('[data-field="message_id"]'));
  check(shown === messageId, `the detail of ${id} shows message_id ${shown}, the row ${messageId}`);
  const payload = await text(detail.locator('[data-ref="payload"]'));
  check(payload.length > 0, 'the detail shows no payload line');
  await detail.locator('[data-ref="headers"]').waitFor({ timeout: TIMEOUT });
  await page.locator(testid('close-detail')).click({ timeout: TIMEOUT });
  await detail.waitFor({ state: 'hidden', timeout: TIMEOUT });
  return `dead letter ${id} (${messageId}), payload: ${payload.split('\n')[0].slice(0, 60)}`;
}

async function pasteToken(page, opts) {
  await page.locator(testid('token')).fill(opts.token, { timeout: TIMEOUT });
  const stored = await page.evaluate(() => sessionStorage.getItem('outbox-console-token'));
  check(stored === opts.token, 'the token was not kept in sessionStorage');
}

// A filter typed but not applied is what a change acts on (and shows):
// Discard must not preview, behind the typed text, the filter applied last.
async function typedFilter(page, opts) {
  const exchange = page.locator(`${testid('dead-page')} input[name="exchange"]`);
  await exchange.fill('no-such-exchange', { timeout: TIMEOUT });
  await page.locator(testid('discard')).click({ timeout: TIMEOUT });
  await waitOrError(page, testid('preview'), 'the discard preview');
  const preview = await text(page.locator(testid('preview')));
  check(/would discard 0\b/.test(preview), `the preview says "${preview}", not "would discard 0"`);
  check(preview.includes('no-such-exchange'), `the preview does not show the typed filter: "${preview}"`);
  await page.locator(`${testid('preview')} ${testid('cancel')}`).click({ timeout: TIMEOUT });
  const before = await loadsSoFar(page);
  await exchange.fill(opts.exchange, { timeout: TIMEOUT });
  await page.locator(testid('filter')).click({ timeout: TIMEOUT });
  await waitDeadLoaded(page, before);
  return `"${preview}"`;
}

async function requeueTwo(page) {
  const { total, ids } = await deadRowsShown(page);
  const chosen = ids.slice(0, 2);
  for (const id of chosen) {
    await page.locator(`${testid('dead-row')}[data-id="${id}"] ${testid('select')}`).check({ timeout: TIMEOUT });
  }
  await page.locator(testid('requeue')).click({ timeout: TIMEOUT });
  await waitOrError(page, testid('preview'), 'the requeue preview');
  const preview = await text(page.locator(testid('preview')));
  check(/would requeue 2\b/.test(preview), `the preview says "${preview}", not "would requeue 2"`);
  const before = await loadsSoFar(page);
  await page.locator(testid('confirm')).click({ timeout: TIMEOUT });
  await waitOrError(page, testid('notice'), 'the requeue result');
  const notice = await text(page.locator(`${testid('notice')} .banner-text`));
  check(/requeued 2 of 2\b/.test(notice), `the notice says "${notice}", not "requeued 2 of 2"`);
  await waitDeadLoaded(page, before);
  const after = await deadRowsShown(page);
  check(after.ids.length === ids.length - 2, `the list had ${ids.length} rows and has ${after.ids.length} after requeueing 2`);
  check(after.total === total - 2, `the total was ${total} and is ${after.total} after requeueing 2`);
  const still = chosen.filter((id) => after.ids.includes(id));
  check(still.length === 0, `requeued dead letters still listed: ${still.join(', ')}`);
  return `ids ${chosen.join(', ')}; "${notice}"; ${after.ids.length} rows left`;
}

async function auditLog(page) {
  await page.locator(`.nav a[href="#/audit"]`).click({ timeout: TIMEOUT });
  await waitOrError(page, testid('audit-row'), 'the audit log');
  const rows = await page.locator(testid('audit-row')).evaluateAll((trs) => trs.map((tr) => {
    const cell = (key) => (tr.querySelector(`td[data-col="${key}"]`)?.textContent ?? '').trim();
    return { action: cell('action'), via: cell('via'), dryRun: cell('dry_run'), changed: cell('changed'), matched: cell('matched') };
  }));
  const first = rows[0];
  const shown = JSON.stringify(first);
  check(first.action === 'requeue', `the first audit row is not a requeue: ${shown}`);
  check(first.via === 'console', `the first audit row does not say via console: ${shown}`);
  check(first.dryRun === 'no', `the first audit row is a dry run: ${shown}`);
  check(first.changed === '2', `the first audit row did not change 2: ${shown}`);
  const dry = rows.find((r) => r.action === 'requeue' && r.dryRun === 'yes' && r.via === 'console');
  check(dry, 'no dry-run requeue from the console in the audit log');
  return `${rows.length} rows, first ${shown}`;
}

// ---- main

async function run(opts) {
  await mkdir(opts.screenshots, { recursive: true });
  const profile = await mkdtemp(join(tmpdir(), 'outbox-console-chromium-'));
  let context;
  const pageErrors = [];
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: '/usr/bin/chromium',
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: { width: 1280, height: 800 },
      timeout: 30_000,
    });
    context.setDefaultTimeout(TIMEOUT);
    const page = context.pages()[0] ?? await context.newPage();
    page.on('pageerror', (err) => pageErrors.push(err.message));
    page.on('console', (message) => {
      if (message.type() === 'error' && /Content Security Policy/i.test(message.text())) pageErrors.push(message.text());
    });
    try {
      await steps(page, opts, pageErrors);
    } catch (err) {
      await page.screenshot({ path: join(opts.screenshots, 'failure.png') }).catch(() => {});
      err.banner = await bannerText(page);
      throw err;
    }
  } finally {
    await context?.close().catch(() => {});
    await rm(profile, { recursive: true, force: true });
  }
}

// The page's error banner, when it shows one.
async function bannerText(page) {
  const error = page.locator(testid('error'));
  return (await error.isVisible().catch(() => false)) ? text(error.locator('.banner-text')).catch(() => '') : '';
}

async function steps(page, opts, pageErrors) {
  const noPageErrors = () => check(pageErrors.length === 0, `the page threw: ${pageErrors.join('; ')}`);
  const all = [
    ['overview shows the cards and the lag chart', () => overview(page, opts)],
    [`dead letters filtered on exchange ${opts.exchange}`, () => filterDead(page, opts)],
    ['the first dead letter\'s detail opens', () => openDetail(page)],
    ['the token is pasted', () => pasteToken(page, opts)],
    ['a change acts on the filter typed, applied first', () => typedFilter(page, opts)],
    ['two selected dead letters are requeued after a preview', () => requeueTwo(page)],
    ['the audit log records the requeue from the console', () => auditLog(page)],
  ];
  for (const [name, fn] of all) {
    await step(name, async () => {
      const detail = await fn();
      noPageErrors();
      return detail;
    });
  }
}

const opts = options();
try {
  await run(opts);
  console.log('console: all steps passed');
} catch (err) {
  const where = err.step ? `step "${err.step}"` : 'setup';
  // A Playwright error's first line says what it waited for; the rest is its call log.
  const why = err instanceof StepFailure || err.name === 'TimeoutError' ? err.message : (err.stack || String(err));
  console.error(`FAIL - ${where}: ${why}`);
  if (err.banner && !why.includes(err.banner)) console.error(`the page's error banner says: ${err.banner}`);
  console.error(`(screenshot: ${join(opts.screenshots, 'failure.png')})`);
  process.exit(1);
}
