#!/usr/bin/env node
// A two-turn conversation with an aiosfs agent through Node's fs API, no dependencies.
//
//   node agent.js [--agent AGENT_DIR] [--max-tokens N] [QUESTION1 QUESTION2]
//
// AGENT_DIR defaults to $AIOSFS_AGENT_DIR (set by the manifest supervisor). The agent's
// `call` file is opened once with O_RDWR | O_NONBLOCK: each question is written to it,
// and the answer is read without blocking the event loop: a read that finds no data yet
// fails with EAGAIN and is tried again after a short, growing wait (a poll); a read of
// 0 bytes is the end of the answer. Both questions go through the same descriptor, so
// the second is a follow-up in the same private conversation. A JSON summary (the
// turns, their timings, the agent's status) is written to AGENT_DIR/memory/node.json.
// Errors name the file and the errno; the exit status is then 1 (2 for bad usage).
'use strict';

const fs = require('fs');
const path = require('path');

const POLL_MIN_MS = 5;
const POLL_MAX_MS = 200;
const DEFAULT_QUESTIONS = ['Name one planet of the solar system.', 'Tell me one fact about that planet.'];

class AgentError extends Error {}

// "read /mnt/agents/a/call: ECANCELED (operation canceled)"
function failed(action, file, err, detail) {
  // Node's message is "E2BIG: argument list too long, read": keep the words between.
  const words = err.message.replace(/^[A-Z0-9_]+: /, '').replace(/, (open|read|write|close)\b.*$/, '');
  const why = err.code ? `${err.code} (${words})` : err.message;
  return new AgentError(`${action} ${file}: ${why}${detail ? `; ${detail}` : ''}`);
}

function usage(message) {
  process.stderr.write(`agent.js: ${message}\nusage: node agent.js [--agent AGENT_DIR] [--max-tokens N] [QUESTION1 QUESTION2]\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const options = { agent: process.env.AIOSFS_AGENT_DIR || '', maxTokens: 48, questions: [] };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--agent' || arg === '--max-tokens') {
      if (i + 1 >= argv.length) usage(`${arg} needs a value`);
      const value = argv[++i];
      if (arg === '--agent') options.agent = value;
      else options.maxTokens = Number.parseInt(value, 10);
    } else if (arg.startsWith('--')) {
      usage(`unknown option ${arg}`);
    } else {
      options.questions.push(arg);
    }
  }
  if (!options.agent) usage('no agent directory: pass --agent DIR or set AIOSFS_AGENT_DIR');
  if (!(options.maxTokens >= 1)) usage('--max-tokens needs a positive integer');
  if (options.questions.length === 0) options.questions = DEFAULT_QUESTIONS;
  if (options.questions.length !== 2) usage('give two questions, or none for the default ones');
  return options;
}

// Read one answer from a non-blocking descriptor: EAGAIN means "not yet", 0 bytes the end.
function readAnswer(fd, file) {
  return new Promise((resolve, reject) => {
    const buffer = Buffer.alloc(65536);
    const chunks = [];
    let eagain = 0;
    let delay = POLL_MIN_MS;
    const step = () => {
      fs.read(fd, buffer, 0, buffer.length, null, (err, n) => {
        if (err && err.code === 'EAGAIN') {
          eagain += 1;
          setTimeout(step, delay);
          delay = Math.min(delay * 2, POLL_MAX_MS);
          return;
        }
        if (err) {
          const partial = Buffer.concat(chunks).toString('utf8');
          reject(failed('read', file, err, `partial answer: ${JSON.stringify(partial)}`));
          return;
        }
        if (n === 0) {
          resolve({ text: Buffer.concat(chunks).toString('utf8'), eagain });
          return;
        }
        chunks.push(Buffer.from(buffer.subarray(0, n)));
        delay = POLL_MIN_MS;
        step();
      });
    };
    step();
  });
}

function readSmall(file) {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw failed('read', file, err);
  }
}

async function converse(agent, questions, maxTokens) {
  for (const name of ['call', 'status', 'memory']) {
    if (!fs.existsSync(path.join(agent, name))) {
      throw new AgentError(`${path.join(agent, name)}: missing (is ${agent} an aiosfs agent directory?)`);
    }
  }
  const call = path.join(agent, 'call');
  let fd;
  try {
    fd = fs.openSync(call, fs.constants.O_RDWR | fs.constants.O_NONBLOCK);
  } catch (err) {
    throw failed('open', call, err);
  }
  const turns = [];
  try {
    for (const question of questions) {
      const request = JSON.stringify({ prompt: question, temperature: 0, max_tokens: maxTokens });
      const started = Date.now();
      try {
        fs.writeSync(fd, request);
      } catch (err) {
        throw failed('write', call, err);
      }
      let answer;
      try {
        answer = await readAnswer(fd, call); // the first read commits the turn
      } catch (err) {
        let why = '';
        try {
          why = readSmall(path.join(agent, 'error')).trim();
        } catch (_) {
          // the read error says enough
        }
        throw new AgentError(`${err.message}${why ? `; error file: ${why}` : ''}`);
      }
      turns.push({ question, answer: answer.text.trim(), ms: Date.now() - started, eagain: answer.eagain });
      process.stdout.write(`Q: ${question}\nA: ${answer.text.trim()}\n`);
    }
  } finally {
    fs.closeSync(fd);
  }
  return turns;
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const agent = path.resolve(options.agent);
  const turns = await converse(agent, options.questions, options.maxTokens);
  const status = readSmall(path.join(agent, 'status')).trim();
  const summary = {
    agent: path.basename(agent),
    file: path.join(agent, 'call'),
    turns,
    status,
    written: new Date().toISOString(),
  };
  const out = path.join(agent, 'memory', 'node.json');
  try {
    fs.writeFileSync(out, `${JSON.stringify(summary, null, 2)}\n`);
  } catch (err) {
    throw failed('write', out, err);
  }
  process.stderr.write(`agent.js: ${turns.length} turns, status ${status}; summary in ${out}\n`);
  return status.startsWith('done') ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`agent.js: ${err instanceof AgentError ? err.message : err.stack}\n`);
    process.exit(1);
  },
);
