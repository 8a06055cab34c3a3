// The review page: the blind comparison (keyboard or buttons) and the results with the checkpoint
// choice. Everything it knows comes from the server; the server alone knows which side is which.
const $ = (id) => document.getElementById(id);
let state = null;
let mode = null;
let current = null; // the pair shown
let busy = false; // one judgment in flight at a time: a held key or a double click counts once

async function api(path, body) {
  const r = await fetch(path, body === undefined ? {} : { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
  const v = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(v.error || `${path}: HTTP ${r.status}`);
  return v;
}

function showError(e) {
  $('error').textContent = String(e.message || e);
  $('error').hidden = false;
}

const pct = (x) => (x === null || x === undefined ? '–' : `${(100 * x).toFixed(0)} %`);

function renderModes() {
  const box = $('modes');
  box.replaceChildren();
  for (const m of state.modes) {
    const b = document.createElement('button');
    b.type = 'button';
    b.dataset.mode = m.mode;
    b.setAttribute('aria-pressed', String(m.mode === mode));
    b.textContent = m.mode === 'window' ? `${m.label}: epochs ${state.window.join(', ')}` : m.label;
    b.addEventListener('click', () => {
      mode = m.mode;
      localStorage.setItem('lima-review-mode', mode);
      renderModes();
      loadNext().catch(showError);
    });
    box.append(b);
  }
  $('note').hidden = !(mode === 'window' && state.windowNote);
  $('note').textContent = state.windowNote || '';
}

function showPair(n) {
  current = n.pair;
  $('progress').textContent = `${n.judged} of ${n.total} pairs judged in this selection`;
  $('pair-view').hidden = !current;
  $('done').hidden = !!current;
  if (!current) return;
  $('prompt-index').textContent = `(dev prompt ${current.prompt + 1})`;
  $('prompt').textContent = current.promptText;
  $('reference-box').hidden = current.reference === null;
  $('reference').textContent = current.reference || '';
  $('left').querySelector('.text').textContent = current.left;
  $('right').querySelector('.text').textContent = current.right;
  $('left').scrollTop = 0;
  $('right').scrollTop = 0;
}

async function loadNext() {
  showPair(await api(`/api/next?mode=${encodeURIComponent(mode)}`));
}

async function judge(choice) {
  if (!current || busy) return;
  busy = true;
  for (const b of document.querySelectorAll('.verdicts button')) b.disabled = true;
  try {
    const r = await api('/api/judge', { id: current.id, mode, choice });
    showPair(r.next);
  } catch (e) {
    showError(e);
  } finally {
    busy = false;
    for (const b of document.querySelectorAll('.verdicts button')) b.disabled = false;
  }
}

function cell(tr, text, cls) {
  const td = document.createElement('td');
  if (cls) td.className = cls;
  if (text instanceof Node) td.append(text);
  else td.textContent = text;
  tr.append(td);
  return td;
}

function renderResults() {
  const body = $('results-table').querySelector('tbody');
  body.replaceChildren();
  for (const c of state.candidates) {
    const tr = document.createElement('tr');
    tr.dataset.epoch = String(c.epoch);
    if (!c.other && state.chosen && state.chosen.epoch === c.epoch) tr.className = 'is-chosen';
    cell(tr, c.label);
    const n = c.wins + c.ties + c.losses;
    const bar = document.createElement('div');
    bar.className = 'bar';
    bar.title = n ? `${c.wins} wins, ${c.ties} about the same, ${c.losses} losses` : 'not judged yet';
    for (const [k, v] of [['win', c.wins], ['tie', c.ties], ['loss', c.losses]]) {
      const s = document.createElement('span');
      s.className = k;
      s.style.width = n ? `${(100 * v) / n}%` : '0';
      bar.append(s);
    }
    cell(tr, bar);
    cell(tr, `${c.wins} / ${c.ties} / ${c.losses}`, 'num wtl');
    cell(tr, pct(c.eotShare), 'num');
    cell(tr, c.meanWords.toFixed(1), 'num');
    cell(tr, pct(c.repeatedTrigrams), 'num');
    cell(tr, c.devLoss === null ? '–' : c.devLoss.toFixed(4), 'num');
    const btn = document.createElement('button');
    btn.type = 'button';
    btn.className = 'choose';
    btn.dataset.epoch = String(c.epoch);
    const isChosen = !c.other && state.chosen && state.chosen.epoch === c.epoch;
    btn.textContent = isChosen ? 'chosen' : 'Use this checkpoint';
    btn.disabled = !c.choosable || isChosen;
    if (!c.choosable) btn.title = c.other ? 'another run' : c.epoch === 0 ? 'the base model' : 'no model weights kept in this checkpoint';
    btn.addEventListener('click', () => choose(c.epoch).catch(showError));
    cell(tr, btn);
    body.append(tr);
  }
  $('results-summary').textContent = `${state.judgments} judgments in review.jsonl.`;
  $('chosen').textContent = state.chosen ? `Chosen: epoch ${state.chosen.epoch} (${state.chosen.checkpoint}), ${state.chosen.chosenAt}, after ${state.chosen.judgments} judgments; written to chosen.json.` : 'No checkpoint chosen yet.';
}

async function choose(epoch) {
  const r = await api('/api/choose', { epoch });
  state.chosen = r.chosen;
  renderResults();
}

async function route() {
  const tab = location.hash === '#results' ? 'results' : 'compare';
  $('compare').hidden = tab !== 'compare';
  $('results').hidden = tab !== 'results';
  $('tab-compare').classList.toggle('active', tab === 'compare');
  $('tab-results').classList.toggle('active', tab === 'results');
  state = await api('/api/state');
  if (tab === 'results') renderResults();
}

document.addEventListener('keydown', (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey || $('compare').hidden) return;
  const choice = { a: 'left', ArrowLeft: 'left', b: 'right', ArrowRight: 'right', s: 'tie', ArrowDown: 'tie' }[e.key];
  if (!choice) return;
  e.preventDefault();
  if (!e.repeat) judge(choice);
});

async function start() {
  $('pick-left').addEventListener('click', () => judge('left'));
  $('pick-right').addEventListener('click', () => judge('right'));
  $('pick-tie').addEventListener('click', () => judge('tie'));
  window.addEventListener('hashchange', () => route().catch(showError));
  await route();
  $('run').textContent = state.run + (state.against ? `  vs  ${state.against}` : '');
  const saved = localStorage.getItem('lima-review-mode');
  mode = state.modes.some((m) => m.mode === saved) ? saved : state.modes[0].mode;
  renderModes();
  await loadNext();
  document.body.dataset.ready = 'true';
}

start().catch(showError);
