"use strict";
// See package.json: the bot-sdk only touches these bindings when encryption is enabled,
// which the appservice interop scenario never does. Any use is a loud error.
module.exports = new Proxy({}, {
    get(_target, name) {
        if (name === "__esModule" || typeof name === "symbol") return undefined;
        throw new Error(`@matrix-org/matrix-sdk-crypto-nodejs stub: ${String(name)} is not available (encryption is not used by this scenario)`);
    },
});
