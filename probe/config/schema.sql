-- probe's MySQL schema. Safe to run again: every statement is IF NOT EXISTS.

CREATE TABLE IF NOT EXISTS serviceapp (
    id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    appkey VARCHAR(128) NOT NULL,
    description VARCHAR(255) NOT NULL DEFAULT '',
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE KEY uk_serviceapp_appkey (appkey)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS governance_audit (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    changed_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    changed_by VARCHAR(128) NOT NULL,
    env VARCHAR(64) NOT NULL,
    appkey VARCHAR(128) NOT NULL,
    service VARCHAR(128) NOT NULL,
    node VARCHAR(300) NOT NULL,
    action VARCHAR(32) NOT NULL,
    old_value VARCHAR(1024) NULL,
    new_value VARCHAR(1024) NOT NULL,
    KEY ix_governance_audit_appkey (appkey, changed_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Web console (probe.console): its users and their login sessions.
CREATE TABLE IF NOT EXISTS console_users (
    id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    username VARCHAR(64) NOT NULL,
    password_hash VARCHAR(255) NOT NULL,
    role VARCHAR(16) NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE KEY uk_console_users_username (username)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- A session row is found by the SHA-256 of its cookie, so a leaked table holds no
-- usable cookie. Times are epoch seconds.
CREATE TABLE IF NOT EXISTS console_sessions (
    token_hash CHAR(64) NOT NULL PRIMARY KEY,
    username VARCHAR(64) NOT NULL,
    csrf_token VARCHAR(64) NOT NULL,
    flash VARCHAR(2048) NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    KEY ix_console_sessions_username (username),
    KEY ix_console_sessions_expires (expires_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- The config center's history: one row per change of a key, the durable copy of
-- the config (ZooKeeper's /configs can be restored from it). new_value NULL = deleted.
CREATE TABLE IF NOT EXISTS config_history (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    env VARCHAR(64) NOT NULL,
    appkey VARCHAR(128) NOT NULL,
    config_key VARCHAR(128) NOT NULL,
    version INT UNSIGNED NOT NULL,
    action VARCHAR(16) NOT NULL,
    old_value MEDIUMTEXT NULL,
    new_value MEDIUMTEXT NULL,
    changed_by VARCHAR(128) NOT NULL,
    changed_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    UNIQUE KEY uk_config_history_version (env, appkey, config_key, version),
    KEY ix_config_history_appkey (env, appkey, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
